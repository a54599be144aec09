"""What a reward model learns from: labelled samples (CE) or preference pairs (BT), and their held-out twins."""

from __future__ import annotations

import torch

from engine.config import RunConfig
from engine.data.datasets import SOURCES, build_dataset, data_source
from engine.errors import ConfigError
from engine.model.dit import DiTConfig

PAIR_FIELDS = ("pair_id", "preferred")


class PreferencePairs(torch.utils.data.Dataset):
    """(preferred, rejected) pairs over a dataset: an item is the preferred sample's tensors plus the rejected
    sample's under `rejected_*` keys."""

    def __init__(self, base, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            raise ValueError("no preference pairs in the dataset")
        self.base, self.pairs, self.null_context = base, pairs, base.null_context

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        preferred, rejected = self.pairs[index]
        return {**self.base[preferred], **{f"rejected_{k}": v for k, v in self.base[rejected].items()}}


def pairs_from_metas(dataset) -> list[tuple[int, int]]:
    """Pairs of a list dataset whose metas carry `pair_id` and `preferred`: two samples per pair id, one preferred."""
    groups: dict[str, list[int]] = {}
    for index, meta in enumerate(dataset.metas):
        groups.setdefault(str(meta["pair_id"]), []).append(index)
    pairs = []
    for pair_id, members in groups.items():
        flags = [bool(dataset.metas[i]["preferred"]) for i in members]
        if len(members) != 2 or sum(flags) != 1:
            files = ", ".join(str(dataset.sample_paths[i]) for i in members)
            raise ValueError(f"pair_id {pair_id!r}: expected two samples, one with preferred=true; found "
                             f"{len(members)} with preferred={flags} ({files})")
        pairs.append((members[0], members[1]) if flags[0] else (members[1], members[0]))
    return pairs


def labelled_source(data):
    """The data source of a reward run, which must label its samples."""
    source = data_source(data)
    if source.labels == ():
        labelled = " or ".join(repr(name) for name, s in SOURCES.items() if s.labels != ())
        raise ConfigError(f"data.source={data.source!r} has no labels; reward model training needs {labelled} data")
    return source


def labelled_dataset(config: RunConfig, data, trunk_config: DiTConfig, seed: int) -> torch.utils.data.Dataset:
    """The data a reward run trains on: samples with the CE task's label, or preference pairs for BT."""
    reward, source = config.reward, labelled_source(data)
    if reward.loss == "ce" and source.labels is not None and reward.task not in source.labels:
        raise ConfigError(f"reward.task={reward.task!r}: data.source={data.source!r} labels "
                          f"{', '.join(source.labels)}")
    required = (reward.task,) if reward.loss == "ce" else PAIR_FIELDS
    dataset = build_dataset(data, trunk_config, seed, required_fields=required)
    if reward.loss == "ce":
        return dataset
    return PreferencePairs(dataset, (source.pairs or pairs_from_metas)(dataset))


def validation_dataset(config: RunConfig, trunk_config: DiTConfig) -> torch.utils.data.Dataset:
    """The held-out twin of `labelled_dataset`: the source's held-out samples (`data.val_list_file`, other seeds)."""
    source = labelled_source(config.data)
    if source.held_out is None:
        raise ConfigError(f"data.source={config.data.source!r} has no held-out samples for reward model validation")
    data, seed = source.held_out(config.data, config.seed)
    return labelled_dataset(config, data, trunk_config, seed)
