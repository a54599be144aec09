"""Launched by tests/test_engine.py as `deepspeed --num_gpus 2 ulysses_parity.py`: a DiT run sequence-parallel
over 2 ranks must give the single-rank output and, summed over the group, the single-rank parameter gradients.

The latent grid (3 x 3 x 5 = 45 tokens) does not divide by 2, so the padding path is exercised."""

import copy
import sys

import torch
import torch.distributed as dist

from engine.distributed.parallel import apply_ulysses
from engine.distributed.process import init_distributed
from tests.conftest import dit_inputs, randomized_dit


def output_and_grads(model, inputs):
    out = model(**inputs)
    # A loss that weights every output element differently, so misplaced tokens cannot cancel out.
    weights = torch.linspace(-1, 2, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def main() -> int:
    layout, mpu = init_distributed(sp_size=2)
    group = mpu.get_sequence_parallel_group()
    for preset in ("tiny", "tiny-i2v"):
        reference = randomized_dit(preset).train()
        inputs = dit_inputs(reference.config, batch=2, frames=3, height=6, width=10)
        ref_out, ref_grads = output_and_grads(copy.deepcopy(reference), inputs)

        parallel = apply_ulysses(copy.deepcopy(reference), group)
        out, grads = output_and_grads(parallel, inputs)
        for grad in grads.values():
            dist.all_reduce(grad, group=group)  # what DeepSpeed does over a sequence-parallel group

        out_err = (out - ref_out).abs().max().item()
        grad_err = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
        print(f"rank {layout.rank} {preset}: output max abs err {out_err:.2e}, grad max rel err {grad_err:.2e}",
              flush=True)
        if not (out_err <= 1e-5 and grad_err <= 1e-4):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
