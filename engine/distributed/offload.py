"""Per-block activation checkpointing, with the checkpointed block inputs optionally parked in pinned host memory.

With checkpointing, a block's forward keeps nothing but its input (the fp32 residual stream, 1.55 GB per block for
14B at 720P) and recomputes its activations in backward. With offload on a GPU, that input is copied to pinned
host memory on a side stream while the next blocks compute, and copied back on another stream one block ahead of
its recomputation. On a CPU the input already lives in host memory, so offload keeps a reference (same numerics).

Blocks must be deterministic (Wan's blocks have no dropout), since they are recomputed without RNG replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.dit import DiT, Embedded, Rope


@dataclass
class _Slot:
    tensor: torch.Tensor  # the input itself, or its pinned host copy when offloaded
    device: torch.device
    offloaded_event: torch.cuda.Event | None = None
    fetched: torch.Tensor | None = None
    fetched_event: torch.cuda.Event | None = None


class BlockInputStore:
    """Holds checkpointed block inputs between forward and backward, on the host when offloading."""

    def __init__(self, offload: bool) -> None:
        self.offload = offload and torch.cuda.is_available()
        self.slots: dict[int, _Slot] = {}
        self.next_id = 0
        if self.offload:
            self.d2h, self.h2d = torch.cuda.Stream(), torch.cuda.Stream()

    def park(self, x: torch.Tensor) -> int:
        slot_id, self.next_id = self.next_id, self.next_id + 1
        if not (self.offload and x.is_cuda):
            self.slots[slot_id] = _Slot(x, x.device)
            return slot_id
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.d2h):
            host.copy_(x, non_blocking=True)
            x.record_stream(self.d2h)  # keep x's memory from reuse until the copy has run
            event = torch.cuda.Event()
            event.record()
        self.slots[slot_id] = _Slot(host, x.device, offloaded_event=event)
        return slot_id

    def prefetch(self, slot_id: int) -> None:
        slot = self.slots.get(slot_id)
        if slot is None or slot.offloaded_event is None or slot.fetched is not None:
            return
        with torch.cuda.stream(self.h2d):
            self.h2d.wait_event(slot.offloaded_event)
            slot.fetched = slot.tensor.to(slot.device, non_blocking=True)
            slot.fetched_event = torch.cuda.Event()
            slot.fetched_event.record()

    def fetch(self, slot_id: int) -> torch.Tensor:
        self.prefetch(slot_id)
        slot = self.slots.pop(slot_id)
        if slot.offloaded_event is None:
            return slot.tensor
        stream = torch.cuda.current_stream()
        stream.wait_event(slot.fetched_event)
        slot.fetched.record_stream(stream)
        return slot.fetched


class _CheckpointedBlock(torch.autograd.Function):
    """Run a block without keeping activations; in backward, fetch its input, recompute and back-propagate.

    `anchor` is an empty tensor that requires grad, given for blocks with trainable parameters: it puts the output
    into the autograd graph even when no real input requires grad (frozen embeddings: LoRA, the reward model's
    trunk). The parameters themselves cannot be inputs: ZeRO-3 would fix their partitioned shape in autograd.
    """

    @staticmethod
    def forward(ctx, block, store: BlockInputStore, x, e6, context, rope_cos, rope_sin, anchor):
        rope = Rope(rope_cos, rope_sin)
        with torch.no_grad():
            out = block(x, e6, context, rope)
        ctx.block, ctx.store, ctx.slot = block, store, store.park(x.detach())
        ctx.save_for_backward(e6, context, rope_cos, rope_sin)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ctx.store.prefetch(ctx.slot - 1)  # the block before this one is recomputed next
        x = ctx.store.fetch(ctx.slot).detach().requires_grad_(ctx.needs_input_grad[2])
        e6, context, rope_cos, rope_sin = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = ctx.block(x, e6, context, Rope(rope_cos, rope_sin))
        torch.autograd.backward(out, grad_out)
        return None, None, x.grad, e6.grad, context.grad, None, None, None


def apply_activation_checkpointing(model: DiT, offload: bool = False, store: BlockInputStore | None = None
                                   ) -> BlockInputStore:
    """Checkpoint every block of `model` (in place), parking block inputs on the host when `offload` is set; `store`
    replaces the default BlockInputStore(offload) (benchmarks/memory_model.py traces offload on a CPU with its own)."""
    store = store or BlockInputStore(offload)
    model.enable_gradient_checkpointing(False)  # this replaces the model's own switch
    anchor = torch.empty(0, requires_grad=True)

    def run_block(block, tokens: torch.Tensor, emb: Embedded) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return block(tokens, emb.e6, emb.context, emb.rope)
        trains = any(p.requires_grad for p in block.parameters())
        return _CheckpointedBlock.apply(block, store, tokens, emb.e6, emb.context, emb.rope.cos, emb.rope.sin,
                                        anchor if trains else None)

    model.run_block = run_block
    return store
