"""Training data: episode shards → deterministic per-rank, per-worker streams → tokenized batches."""
