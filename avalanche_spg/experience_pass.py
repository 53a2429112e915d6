"""One experience's importance ``gamma``, as :class:`~avalanche_spg.SPGPlugin` computes it.

Below the plugin, above the importance pass: this module picks the data and the settings of the
pass after an experience has trained (paper, Section 3.1) and calls
:func:`avalanche_spg.importance_pass.compute_gamma` (task heads) or
:func:`avalanche_spg.class_incremental.compute_gamma_class_incremental` (one shared classifier).
Everything it needs from the plugin comes as arguments; it changes nothing but what the pass
returns.

* **Data**: the experience's own training data (not the strategy's dataloader, which replay
  plugins extend), with its training transforms, in a fixed order; optionally the first
  ``max_samples`` samples of a seeded random permutation of it.
* **Reference minibatch**: ``batch_size``, or the training minibatch, i.e. ``train_mb_size``
  times the number of processes under DDP (each optimizer step averages ``train_mb_size``
  samples from every process).
* **Several processes**: each takes its shard of the positions and the summed gradients are
  added across processes (:func:`avalanche_spg.process_group.distributed_shard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from avalanche_spg.class_incremental import compute_gamma_class_incremental
from avalanche_spg.importance_pass import (
    GradReducer,
    ImportanceMethod,
    ModelForward,
    avalanche_convention,
    compute_gamma,
    find_multihead_classifier,
)
from avalanche_spg.process_group import distributed_shard, world_size

__all__ = ["experience_gamma", "sampled_dataset"]


def experience_gamma(
    model: nn.Module,
    experience: Any,
    features: dict[str, nn.Parameter],
    heads: dict[str, nn.Parameter],
    current: list[int],
    *,
    device: torch.device | str,
    train_mb_size: int,
    seen_tasks: Sequence[int],
    class_groups: Sequence[Sequence[int]],
    seed: int,
    method: ImportanceMethod,
    batch_size: int | None,
    pass_batch_size: int | None,
    max_samples: int | None,
    num_workers: int,
    class_incremental: bool,
    previous_heads: bool,
) -> dict[str, Tensor]:
    """``gamma`` of the experience just trained (Section 3.1), not yet folded into ``A``.

    ``model`` is the unwrapped model (no DDP wrapper), ``features``/``heads`` its parameters as
    the plugin's head selection splits them, ``current`` the experience's task labels,
    ``seen_tasks`` the task labels trained before (their heads are protected when
    ``previous_heads``) and ``class_groups`` the classes of every earlier experience (the
    "heads" with ``class_incremental``). ``seed`` seeds the permutation that ``max_samples``
    takes its samples from (the plugin passes the number of experiences seen). The other
    arguments are the plugin's of the same meaning (``importance_method``,
    ``importance_batch_size``, ``importance_pass_batch_size``, ``importance_max_samples``,
    ``num_workers``, ``class_incremental``, ``previous_heads``).
    """
    dataset = experience.dataset
    dataset = dataset.train() if hasattr(dataset, "train") else dataset
    dataset = sampled_dataset(dataset, max_samples, seed)
    reference_batch = batch_size or train_mb_size * world_size()
    # The model is called as Avalanche's training calls it (avalanche_forward).
    forward, task_aware = avalanche_convention(model)
    total = len(dataset)
    shard = distributed_shard(total)
    indices, reducer = shard if shard is not None else (None, None)
    # What both passes are given alike: where they run, on which samples, how the model is called.
    common: _PassSettings = {
        "device": device,
        "num_workers": num_workers,
        "forward": forward,
        "indices": indices,
        "total_samples": total,
        "grad_reducer": reducer,
    }
    if class_incremental:
        return compute_gamma_class_incremental(
            model,
            dataset,
            features,
            heads,
            experience.classes_in_this_experience,
            class_groups if previous_heads else [],
            batch_size=reference_batch,
            **common,
        )
    return compute_gamma(
        model,
        dataset,
        features,
        current,
        # A model without task heads has no older heads to protect.
        seen_tasks if previous_heads and task_aware else [],
        reference_batch_size=reference_batch,
        method=method,
        pass_batch_size=pass_batch_size,
        classifier=find_multihead_classifier(model),
        **common,
    )


class _PassSettings(TypedDict):
    """The keyword arguments that :func:`experience_gamma` gives both importance passes."""

    device: torch.device | str
    num_workers: int
    forward: ModelForward
    indices: list[int] | None
    total_samples: int
    grad_reducer: GradReducer | None


def sampled_dataset(dataset: Any, max_samples: int | None, seed: int) -> Any:
    """``dataset``, or its first ``max_samples`` samples of a random permutation seeded with
    ``seed``, in their original order (keeping the dataset's ``collate_fn``)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)
    return _SubsetWithCollate(dataset, sorted(chosen[:max_samples].tolist()))


class _SubsetWithCollate(torch.utils.data.Dataset):
    """A subset that keeps the parent dataset's ``collate_fn``."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]
