"""Everything about blocks, embeddings and top-k: tokenizer, block store, synthetic corpus, embedding,
index versions and shards. No gradients and no training: trainer/ calls in, never the reverse."""
