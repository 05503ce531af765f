"""Ray at the edge: thin actors around trainer/ and indexer/ (trainers, embedding workers, shard
servers) for the distributed path. The single-process path in trainer/loop.py needs none of it."""
