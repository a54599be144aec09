"""prfl engine: the Wan2.1 DiT, flow matching, typed configs, the DeepSpeed trainer (Ulysses, offload, LoRA, EMA),
the steps it trains (SFT, the PAVRM reward model, PRFL, the RGB ReFL baseline), sampling and evaluation; one concept
per file."""
