"""Training data: the on-disk latent format, in-memory datasets and the sources plugins register, the run-wide sample
order, preference pairs, video files and preprocessing."""
