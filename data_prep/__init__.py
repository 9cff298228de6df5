"""Data preparation: raw datasets (S-NI, P3, demo tasks) → episode shards (WebDataset tars + manifest)."""
