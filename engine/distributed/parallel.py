"""Ulysses sequence parallelism for the DiT, over the groups of engine/distributed/process.py.

Ulysses (`apply_ulysses`) works on an unmodified DiT through its seams:
- `DiT.embed`: the token sequence is padded to a multiple of `sp_size` and each rank keeps its slice, with the
  rotary phases of that slice;
- `Attention` (self-attention core): DeepSpeed's `DistributedAttention` all-to-alls q/k/v from sequence shards to
  head shards, the local attention ignores the padding keys, and the output goes back to sequence shards;
- `DiT.unpatchify`: the head runs on each slice (it is per token), and its outputs are gathered, padding dropped,
  before unpatchifying.
Cross-attention needs no communication: every rank holds the whole text. Code that reads the sharded token
features directly (the reward model's pooling) finds the shard layout and group reductions in
`model.sequence_shards`.

Gradient convention: every rank of a group computes the same loss; a rank's parameter and input gradients are its
share, and their sum over the group (what DeepSpeed reduces) is the true gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.errors import ConfigError
from engine.model.dit import DiT, Embedded, attention


class _GatherSequence(torch.autograd.Function):
    """All-gather sequence shards along dim 1. Every rank of the group then computes the same loss from the same
    full tensor, so the gradient of a rank's shard is its own slice of the incoming gradient (no sum)."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.length = group, shard.shape[1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = dist.get_rank(ctx.group) * ctx.length
        return grad[:, start:start + ctx.length].contiguous(), None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum. Its consumers run on every rank and each hands back only its share of their gradient
    (`SequenceShards.replicated`), so the gradient of a rank's partial is the sum of those shares."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = partial.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass
class SequenceShards:
    """How the current forward's token sequence is split over a sequence-parallel group."""

    group: object
    world: int
    rank: int
    valid_len: int = 0  # unpadded token count of the current forward

    def valid_mask(self, shard_len: int, device: torch.device) -> torch.Tensor:
        """[shard_len] bool: which of this rank's tokens are real (the padding sits at the end of the sequence)."""
        return torch.arange(self.rank * shard_len, (self.rank + 1) * shard_len, device=device) < self.valid_len

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of per-rank partial results (e.g. over each rank's tokens), differentiable."""
        return _SumOverGroup.apply(partial, self.group)

    def max(self, value: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over the group, without gradient."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value

    def replicated(self, value: torch.Tensor) -> torch.Tensor:
        """Mark a result that every rank computes identically: gradient share 1 / world per rank."""
        return _ScaleGrad.apply(value, 1.0 / self.world)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _PaddedAttention(nn.Module):
    """Local attention over the full (padded) sequence of a head shard; padding keys at the end are left out."""

    def __init__(self, backend: str, state: SequenceShards) -> None:
        super().__init__()
        self.backend, self.state = backend, state

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        valid = self.state.valid_len
        return attention(q, k[:, :valid], v[:, :valid], self.backend)


class UlyssesAttention(nn.Module):
    """Drop-in for `Attention`: q/k/v arrive as sequence shards [B, S/sp, N, Dh] and leave the same way."""

    def __init__(self, backend: str, group, state: SequenceShards) -> None:
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.dist_attn = DistributedAttention(_PaddedAttention(backend, state), group, scatter_idx=2, gather_idx=1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.dist_attn(q, k, v, batch_dim_idx=0)


def apply_ulysses(model: DiT, group) -> DiT:
    """Make `model` run sequence-parallel over `group`, in place; parameter names are unchanged."""
    world = dist.get_world_size(group)
    if world == 1:
        return model
    heads = model.config.num_heads
    if heads % world:
        raise ConfigError(f"parallel.sp_size={world} must divide the model's {heads} attention heads")
    rank = dist.get_rank(group)
    state = model.sequence_shards = SequenceShards(group, world, rank)
    for block in model.blocks:
        block.self_attn.attn = UlyssesAttention(model.config.attention_backend, group, state)
    embed, unpatchify = model.embed, model.unpatchify

    def sharded_embed(*args, **kwargs) -> Embedded:
        emb = embed(*args, **kwargs)
        state.valid_len = emb.tokens.shape[1]
        shard = -(-state.valid_len // world)  # ceil
        pad = shard * world - state.valid_len
        tokens = nn.functional.pad(emb.tokens, (0, 0, 0, pad))
        rope = emb.rope._replace(cos=nn.functional.pad(emb.rope.cos, (0, 0, 0, 0, 0, pad)),
                                 sin=nn.functional.pad(emb.rope.sin, (0, 0, 0, 0, 0, pad)))
        lo, hi = rank * shard, (rank + 1) * shard
        # A copy, not a view: a checkpointed first block keeps its input, and a view would keep the whole sequence.
        return emb._replace(tokens=tokens[:, lo:hi].clone(), rope=rope.slice(lo, hi))

    def gathered_unpatchify(out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return unpatchify(_GatherSequence.apply(out, group)[:, :state.valid_len], grid)

    model.embed, model.unpatchify = sharded_embed, gathered_unpatchify
    return model

