"""``sampled_dataset``: the subset that ``importance_max_samples`` takes keeps the parent's
``collate_fn`` (Avalanche datasets collate with their own), takes distinct samples in their
original order, the same ones for the same seed, and leaves a small enough dataset alone."""

from __future__ import annotations

from typing import Any

from avalanche_spg.experience_pass import sampled_dataset


class _Collating:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index

    def collate_fn(self, batch: list[Any]) -> list[Any]:
        return batch


def test_subset_keeps_the_collate_fn_and_takes_distinct_samples_in_order() -> None:
    parent = _Collating(50)
    subset = sampled_dataset(parent, 7, seed=3)
    taken = [subset[i] for i in range(len(subset))]
    assert len(taken) == 7
    assert taken == sorted(set(taken))
    assert subset.collate_fn == parent.collate_fn
    again = sampled_dataset(parent, 7, seed=3)
    assert [again[i] for i in range(7)] == taken
    other = sampled_dataset(parent, 7, seed=4)
    assert [other[i] for i in range(7)] != taken


def test_a_dataset_no_larger_than_max_samples_is_used_whole() -> None:
    parent = _Collating(5)
    assert sampled_dataset(parent, 5, seed=0) is parent
    assert sampled_dataset(parent, None, seed=0) is parent
