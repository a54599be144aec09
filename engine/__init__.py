"""prfl engine: the Wan2.1 DiT, flow matching, configs, and (as they land) reward model, PRFL and trainer."""
