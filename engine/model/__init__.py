"""Models, single-device: the Wan2.1 DiT and its checkpoints, the PAVRM, LoRA, the frozen encoders, flow matching and
sampling. Parallelism and checkpointing are applied from outside (engine.distributed)."""
