"""The run-wide sample order: which dataset index the run's g-th sample is, the same on every rank and after a
resume. Samples of different latent shapes (portrait and landscape videos) train together through `sample_order`,
which keeps each micro-batch to one shape.
"""

from __future__ import annotations

import torch


class GlobalOrder:
    """Which dataset index the run's g-th sample is: epoch e = g // N visits a fresh permutation of the N samples.

    A step consumes consecutive sample numbers, whatever the layout (see `Trainer.sample_numbers`), so a run on
    one rank and a run on eight with the same global batch see the same samples in the same steps, and resuming
    needs only the count of samples consumed.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._order = -1, None

    def index(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, self.num_samples)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator).tolist()
        return self._order[position]


class BucketedOrder:
    """GlobalOrder for a dataset of several latent shapes: the `micro_batch` consecutive sample numbers of a
    micro-batch (starting at a multiple of `micro_batch`, as `Trainer.sample_numbers` takes them) are samples of one
    shape, so they stack.

    Epoch e shuffles each bucket (the samples of one shape), fills its last micro-batch up with the bucket's first
    samples in that order, and visits the micro-batches of all buckets in a random order. Like GlobalOrder it depends
    only on (seed, sample number): every rank and a resumed run agree.
    """

    def __init__(self, shapes: list[tuple[int, ...]], micro_batch: int, seed: int) -> None:
        if not shapes:
            raise ValueError("the dataset is empty")
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch}: expected at least 1")
        buckets: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            buckets.setdefault(tuple(shape), []).append(index)
        self.buckets = [buckets[shape] for shape in sorted(buckets)]
        self.micro_batch, self.seed = micro_batch, seed
        self.epoch_length = sum(-(-len(bucket) // micro_batch) * micro_batch for bucket in self.buckets)
        self._epoch, self._order = -1, None

    def index(self, sample_number: int) -> int:
        epoch, position = divmod(sample_number, self.epoch_length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            batches = []
            for bucket in self.buckets:
                order = [bucket[i] for i in torch.randperm(len(bucket), generator=generator).tolist()]
                order += [order[i % len(order)] for i in range(-len(order) % self.micro_batch)]
                batches += [order[i:i + self.micro_batch] for i in range(0, len(order), self.micro_batch)]
            visit = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch, self._order = epoch, [index for b in visit for index in batches[b]]
        return self._order[position]


def sample_order(dataset, micro_batch: int, seed: int) -> GlobalOrder | BucketedOrder:
    """The run's sample order: GlobalOrder, or BucketedOrder when the dataset's `latent_shapes` differ."""
    shapes = getattr(dataset, "latent_shapes", None)
    if shapes is None or len(set(shapes)) == 1:
        return GlobalOrder(len(dataset), seed)
    return BucketedOrder(shapes, micro_batch, seed)
