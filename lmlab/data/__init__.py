"""A corpus becomes a dataset dir: sources, tokenizers, the split, the streamed prepare, token shards, and the batch
loader training reads them through."""
