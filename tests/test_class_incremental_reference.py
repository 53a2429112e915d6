"""``SPGPlugin(class_incremental=True)`` against an independent reference of its definition.

The reference below is written from the description of the extension (``docs/algorithm.md``,
section 6, and the docstring of ``avalanche_spg.class_incremental``) and shares no code with the
package. With one shared classifier and no task labels, the classes of each experience play the
role of task heads:

* feature parameters (outside the classifier): summed over the experience's minibatches, the
  gradient of the current cross-entropy (over the whole output, minibatch mean) and, for every
  earlier class group, of the sum of that group's logits; each standardised over its tensor,
  ``|tanh|``, maximum over the terms;
* classifier rows: the summed gradient of the current loss restricted to the rows of the current
  classes, standardised over those rows only, ``|tanh|``; every other row 0;
* ``A = max(A, gamma)``, the old ``A`` zero-padded to the grown classifier; then every tensor,
  rows included, has its gradient multiplied by ``1 - A`` (no scalar head rule).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from avalanche.models import IncrementalClassifier
from helpers import DIGITS_FEATURES, CallbackProbe, GradRecorder, make_digits_benchmark, make_naive
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from avalanche_spg import SPGPlugin

BATCH = 32
ROW_PARAMS = ("classifier.classifier.weight", "classifier.classifier.bias")


class _Net(nn.Module):
    """Two hidden layers and one growing classifier (global labels, no task labels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Linear(DIGITS_FEATURES, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU()
        )
        self.classifier = IncrementalClassifier(12, initial_out_features=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


# ------------------------------------------------------------------- independent reference
def _squash(grad: Tensor) -> Tensor:
    """``|tanh((g - mean) / std)|`` over all elements, or zeros when that is undefined."""
    g = grad.detach().double()
    if g.numel() < 2 or not torch.isfinite(g).all() or not (g != 0).any():
        return torch.zeros(grad.shape, dtype=torch.float32)
    std = g.std()
    if not torch.isfinite(std) or float(std) <= 0:
        return torch.zeros(grad.shape, dtype=torch.float32)
    return torch.tanh((g - g.mean()) / std).abs().float()


def _summed_gradients(
    model: nn.Module, dataset: Any, loss_of: Any, names: list[str]
) -> dict[str, Tensor]:
    """Gradients of ``loss_of(output, y)`` summed over the minibatches (fixed order)."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    for batch in DataLoader(dataset, batch_size=BATCH, shuffle=False):
        loss_of(model(batch[0]), batch[1]).backward()
    sums = {}
    for name in names:
        grad = params[name].grad
        sums[name] = torch.zeros_like(params[name]) if grad is None else grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return sums


def reference_gamma(
    model: nn.Module, dataset: Any, current: list[int], earlier: list[list[int]]
) -> dict[str, Tensor]:
    """``gamma`` of one class-incremental experience, on a copy of ``model`` in train mode."""
    model = copy.deepcopy(model).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    features = [n for n in names if n not in ROW_PARAMS]
    # the current experience: cross-entropy over the whole output
    summed = _summed_gradients(model, dataset, lambda out, y: F.cross_entropy(out, y), names)
    gamma = {n: _squash(summed[n]) for n in features}
    for name in ROW_PARAMS:
        rows = torch.zeros(summed[name].shape, dtype=torch.float32)
        mine = [c for c in current if c < rows.shape[0]]
        rows[mine] = _squash(summed[name][mine])
        gamma[name] = rows
    # every earlier class group: the sum of its own logits over the current data
    for group in earlier:
        group = [c for c in group if c not in current]
        if not group:
            continue
        summed = _summed_gradients(
            model, dataset, lambda out, y, group=group: out[:, group].sum(), names
        )
        for n in features:
            gamma[n] = torch.maximum(gamma[n], _squash(summed[n]))
    return gamma


def _grown(old: Tensor, shape: torch.Size) -> Tensor:
    out = torch.zeros(shape)
    out[tuple(slice(0, s) for s in old.shape)] = old
    return out


def reference_accumulate(accumulated: dict[str, Tensor], gamma: dict[str, Tensor]) -> None:
    """``A = max(A, gamma)``, the old ``A`` padded with zeros where a tensor grew."""
    for name, value in gamma.items():
        old = accumulated.get(name)
        accumulated[name] = value if old is None else torch.maximum(_grown(old, value.shape), value)


# --------------------------------------------------------------------------------- the test
@pytest.fixture
def class_stream() -> Any:
    """Digits, classes 0,1 | 2,3 | 4,5 | ... with global labels and no task labels."""
    return make_digits_benchmark(
        5, task_labels=False, n_train=300, n_test=50, fixed_class_order=range(10)
    )


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].cpu() - b[n]).abs().max()) for n in a)


def test_class_incremental_importance_and_masks_match_the_reference(class_stream: Any) -> None:
    model = _Net()
    snapshots: list[nn.Module] = []
    raw, masked = GradRecorder(), GradRecorder()
    before_spg = CallbackProbe(
        after_training_exp=lambda s: snapshots.append(copy.deepcopy(s.model))
    )
    plugin = SPGPlugin(class_incremental=True)
    strategy = make_naive(model, [before_spg, raw, plugin, masked], train_mb_size=BATCH)

    expected: dict[str, Tensor] = {}
    groups: list[list[int]] = []
    importance_after: list[dict[str, Tensor]] = []
    for index, experience in enumerate(class_stream.train_stream[:3]):
        strategy.train(experience)
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        assert classes == [2 * index, 2 * index + 1]
        gamma = reference_gamma(snapshots[-1], experience.dataset.train(), classes, groups)
        if index == 2:
            # the earlier groups' logit terms matter here: without them gamma would differ
            alone = reference_gamma(snapshots[-1], experience.dataset.train(), classes, [])
            assert _max_diff(alone, gamma) > 0.05
        reference_accumulate(expected, gamma)
        groups.append(classes)
        assert _max_diff(plugin.importance, expected) <= 1e-6, index
        importance_after.append(plugin.importance)  # (a copy) checked equal to the reference

    # not a comparison of zeros: old classes' rows and the features carry importance, rows of
    # classes not seen yet carry none (the classifier has grown to the 6 classes seen)
    weight = plugin.importance["classifier.classifier.weight"]
    assert weight.shape == (6, 12)
    assert float(weight[:2].max()) > 0.3 and float(weight[4:].max()) > 0.3
    assert float(plugin.importance["features.0.weight"].max()) > 0.3

    # while experience 2 trained, every gradient (rows included) was scaled by 1 - A as it was
    # after experience 1, padded with zeros for the rows experience 2 added
    factors = importance_after[1]
    for before, after in zip(raw.records[2], masked.records[2], strict=True):
        for name, grad in before.items():
            assert grad is not None and after[name] is not None
            assert torch.equal(after[name], grad * (1 - _grown(factors[name], grad.shape))), name
