"""Ray at the edge: the system's config (config.py), thin actors around trainer/ and indexer/
(trainers, embedding workers, shard servers: actors.py), the refresh coordinator (refresh.py) and
the driver that places them (run.py). The single-process path (trainer/pretrain.py) needs none of it."""
