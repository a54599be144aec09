"""Launched by tests/test_reward_engine.py as `deepspeed --num_gpus 2 reward_sp_parity.py`: a reward model whose
trunk runs sequence-parallel over 2 ranks must give the single-rank logits and, summed over the group, the
single-rank parameter and input-latent gradients (the pooling attends over all tokens across ranks).

The latent grid (3 x 3 x 5 = 45 tokens) does not divide by 2, so padding tokens must be kept out of the pooling."""

import copy
import sys

import torch
import torch.distributed as dist

from engine.distributed.parallel import apply_ulysses
from engine.distributed.process import init_distributed
from engine.model.reward import RewardModel, RewardModelConfig
from tests.conftest import dit_inputs, randomized_dit


def logits_and_grads(model, inputs):
    latents = inputs["x"].clone().requires_grad_()
    logits = model(latents, inputs["t"], inputs["context"])
    (logits * torch.tensor([1.0, -2.0])).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, latents.grad


def main() -> int:
    layout, mpu = init_distributed(sp_size=2)
    group = mpu.get_sequence_parallel_group()
    for num_queries, feature_blocks in ((1, [2]), (3, [1, 2])):
        torch.manual_seed(0)
        config = RewardModelConfig(blocks=2, feature_blocks=feature_blocks, num_queries=num_queries, num_heads=2,
                                   mlp_dims=(24, 12))
        reference = RewardModel(config, randomized_dit("tiny"))
        with torch.no_grad():
            reference.pool.multihead_attn.in_proj_bias.normal_()
        inputs = dit_inputs(reference.trunk.config, batch=2, frames=3, height=6, width=10, text_tokens=9)
        ref_logits, ref_grads, ref_input_grad = logits_and_grads(copy.deepcopy(reference), inputs)

        parallel = copy.deepcopy(reference)
        apply_ulysses(parallel.trunk, group)
        logits, grads, input_grad = logits_and_grads(parallel, inputs)
        for grad in [*grads.values(), input_grad]:
            dist.all_reduce(grad, group=group)  # what DeepSpeed does over a sequence-parallel group

        assert grads.keys() == ref_grads.keys()
        logit_err = (logits - ref_logits).abs().max().item()
        grad_err = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                       for n, g in ref_grads.items())
        input_err = ((input_grad - ref_input_grad).abs().max() / ref_input_grad.abs().max()).item()
        print(f"rank {layout.rank} queries={num_queries} features={feature_blocks}: logits max abs err "
              f"{logit_err:.2e}, param grad max rel err {grad_err:.2e}, input grad max rel err {input_err:.2e}",
              flush=True)
        if not (logit_err <= 1e-5 and grad_err <= 1e-4 and input_err <= 1e-4):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
