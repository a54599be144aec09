"""prfl engine, in layers that import downward only (.importlinter; the test suite runs lint-imports):

    synthetic/     the synthetic motion benchmark (a plugin: registers its presets and data source; nothing in the
                   engine imports it)
    evaluation.py  generation during training: fixed prompts sampled, scored and judged
    steps/         what a training step computes: SFT, PAVRM training, reward feedback (PRFL, RGB ReFL)
    train/         the DeepSpeed trainer: what is trained (specs), DeepSpeed config, checkpoints, EMA, estimates, CLI
    data/          datasets on disk and in memory, sample order, preference pairs, videos, preprocessing
    distributed/   process groups, Ulysses sequence parallelism, activation checkpointing and offload
    config.py      the typed run config (config_io.py: YAML and key=value overrides)
    model/         the Wan2.1 DiT, checkpoints, the PAVRM, LoRA, encoders, flow matching, sampling
    errors.py, atomic.py
    kernels/       fused Triton kernels (RMSNorm, adaLN-modulated LayerNorm, 3D RoPE), each beside its PyTorch
                   reference; import nothing else of the engine
"""
