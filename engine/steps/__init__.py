"""Training steps, `step(model, batch, rng) -> (loss, metrics)`: flow matching (SFT), the PAVRM's CE / BT training,
and reward feedback through one step of the chain, scored in latent space (PRFL) or in pixels (RGB ReFL)."""
