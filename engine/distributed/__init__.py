"""Process groups, Ulysses sequence parallelism and activation checkpointing / offload, applied to a model from
outside."""
