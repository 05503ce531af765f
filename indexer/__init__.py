"""Everything about blocks, embeddings and top-k: block store, embedding, index versions, shards."""
