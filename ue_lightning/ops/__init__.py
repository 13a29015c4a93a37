"""Small pure operations shared by the modules: attacks over a loss (PGD), differentiable augmentation, per-sample
random draws, and the de-duplication of a DistributedSampler's padded shards."""
