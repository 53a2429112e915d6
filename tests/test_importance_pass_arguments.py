"""``compute_gamma`` called directly: arguments that cannot give the paper's importance
(Section 3.1) are refused with a ``ValueError`` naming them, before the model runs, instead of
an importance of 0, a sum that counts samples twice, or a bare error from deep inside."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from torch.utils.data import TensorDataset

from avalanche_spg.class_incremental import compute_gamma_class_incremental
from avalanche_spg.importance_pass import compute_gamma
from avalanche_spg.models import MultiHeadMLP


@pytest.fixture(scope="module")
def setup() -> tuple[MultiHeadMLP, TensorDataset]:
    """A two-head MLP (heads 0 and 1 exist) and 20 samples of task 0."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 8), torch.randint(0, 2, (20,))
    model = MultiHeadMLP(8, (6,))
    stream = tensors_benchmark([(x, y), (x, y)], [(x, y), (x, y)], task_labels=[0, 1])
    for experience in stream.train_stream:
        avalanche_model_adaptation(model, experience)
    return model, TensorDataset(x, y, torch.zeros(20, dtype=torch.long))


def _features(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("classifier.")}


def _call(setup: Any, **changes: Any) -> dict[str, torch.Tensor]:
    model, dataset = setup
    arguments: dict[str, Any] = dict(
        model=model,
        dataset=dataset,
        feature_params=_features(model),
        current_tasks=[0],
        previous_tasks=[1],
        device="cpu",
        reference_batch_size=4,
    )
    arguments.update(changes)
    return compute_gamma(**arguments)


def test_the_valid_call_gives_importance(setup: Any) -> None:
    gamma = _call(setup)
    assert set(gamma) == {"features.1.weight", "features.1.bias"}
    assert all(bool(v.any()) for v in gamma.values())


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_parameters_of_another_model_are_refused(setup: Any, method: str) -> None:
    """A copy's parameters never get a gradient: their importance used to be 0, silently."""
    other = copy.deepcopy(setup[0])
    with pytest.raises(ValueError, match=r"not parameters of the model: \['features.1.weight'"):
        _call(setup, feature_params=_features(other), method=method)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_frozen_parameters_are_refused(setup: Any, method: str) -> None:
    """The fast pass used to raise a bare RuntimeError, the reference pass to give 0."""
    model = setup[0]
    model.features[1].weight.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match=r"do not require a gradient: \['features.1.weight'"):
            _call(setup, method=method)
    finally:
        model.features[1].weight.requires_grad_(True)


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_an_earlier_task_without_a_head_is_refused(setup: Any, method: str) -> None:
    """It used to be a bare KeyError('5') from inside the classifier."""
    with pytest.raises(ValueError, match=r"previous_tasks \[5\] have no head"):
        _call(setup, previous_tasks=[1, 5], method=method)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"indices": [0, 5, 25]}, r"\[25\]"),  # used to be an IndexError from the dataset
        ({"indices": list(range(20)), "total_samples": 5}, r"\[5, 6"),  # silently reweighted
        ({"indices": [0, 0, 1, 2]}, r"\[0\] more than once"),  # silently counted twice
        ({"total_samples": 30}, "total_samples=30"),
        ({"indices": [0.5]}, "0.5"),
        ({"reference_batch_size": True}, "reference_batch_size must be an int >= 1, got True"),
        ({"reference_batch_size": 2.5}, "got 2.5"),  # the message named 127.5
        ({"pass_batch_size": 0}, "pass_batch_size"),
        ({"sum_memory_budget": 1.5}, "sum_memory_budget"),
    ],
)
def test_positions_and_sizes_are_checked(setup: Any, changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        _call(setup, **changes)


def test_the_class_incremental_pass_checks_the_same(setup: Any) -> None:
    model, dataset = setup
    other = _features(copy.deepcopy(model))
    for changes, named in (
        ({"feature_params": other}, "not parameters of the model"),
        ({"indices": [3, 3]}, "more than once"),
        ({"batch_size": 0}, "batch_size"),
    ):
        arguments: dict[str, Any] = dict(
            feature_params=_features(model),
            row_params={},
            current_classes=[0, 1],
            previous_groups=[],
            device="cpu",
            batch_size=4,
        )
        arguments.update(changes)
        with pytest.raises(ValueError, match=named):
            compute_gamma_class_incremental(model, dataset, **arguments)


# ------------------------------------------------------------------ devices without float64
@pytest.mark.parametrize("method", ["fast", "reference"])
def test_the_pass_creates_no_float64_tensor_on_a_device_without_float64(
    setup: Any, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Apple's MPS cannot hold a float64 tensor, and the pass summed its weighted losses in
    float64 there. Seen as such a device, the CPU runs the whole pass (forward and backward)
    without a float64 tensor, and the importance stays within float32 rounding."""
    from torch.overrides import TorchFunctionMode

    import avalanche_spg.importance

    expected = _call(setup, method=method)

    class Float64Watch(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                    self.seen.append(getattr(func, "__name__", repr(func)))
            return out

    monkeypatch.setattr(avalanche_spg.importance, "_NO_FLOAT64", frozenset({"mps", "cpu"}))
    with Float64Watch() as watch:
        gamma = _call(setup, method=method)
    assert watch.seen == []
    for name, value in gamma.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5)
