"""The embedding model: loading a checkpoint, the embedding each family defines, TorchScript forwards."""
