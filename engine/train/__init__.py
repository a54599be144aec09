"""The DeepSpeed trainer: what is trained and exported (specs), the DeepSpeed config it runs with, per-sample
randomness, checkpoints, EMA, memory estimates and the runners' command line."""
