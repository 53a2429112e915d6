"""The importance math of ``avalanche_spg.importance`` on hand-computed tensors (paper Section
3.1; ``docs/algorithm.md``, sections 1, 2 and 4)."""

from __future__ import annotations

import math

import pytest
import torch

from avalanche_spg.importance import (
    accumulate_importance,
    fit_to_shape,
    head_scale,
    is_usable_gradient,
    max_accumulate,
    standardized_importance,
)


def _by_hand(values: list[float]) -> list[float]:
    """|tanh((g - mean) / std)| with the unbiased std, in plain Python."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [abs(math.tanh((v - mean) / std)) for v in values]


# ----------------------------------------------------------------------------- the formula
def test_standardized_importance_matches_hand_computation_1d() -> None:
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = torch.tensor(_by_hand([1.0, 2.0, 3.0, 4.0]))
    # mean 2.5, unbiased std sqrt(5/3): z = +-0.3873, +-1.1619
    assert torch.allclose(standardized_importance(grad), expected, atol=1e-6)
    assert math.isclose(expected[0].item(), math.tanh(1.5 / math.sqrt(5 / 3)), rel_tol=1e-6)


def test_standardized_importance_matches_hand_computation_2d_unbiased_std() -> None:
    grad = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    # mean 0.75; unbiased std = sqrt((3 * 0.75^2 + 2.25^2) / 3) = 1.5 (the biased one is 1.299)
    # z = -0.5, -0.5, -0.5, 1.5
    expected = torch.tensor([[math.tanh(0.5)] * 2, [math.tanh(0.5), math.tanh(1.5)]])
    result = standardized_importance(grad)
    assert result.shape == grad.shape
    assert torch.allclose(result, expected, atol=1e-6)


def test_standardized_importance_takes_abs_of_tanh() -> None:
    result = standardized_importance(torch.tensor([-5.0, 0.0, 0.0, 0.0, 1.0]))
    assert (result >= 0).all()
    # the most negative gradient is the most important element
    assert int(result.argmax()) == 0


@pytest.mark.parametrize("scale", [1e-6, 0.37, 3.0, 1e5])
def test_gamma_is_invariant_to_a_positive_loss_scale(scale: float) -> None:
    torch.manual_seed(1)
    grad = torch.randn(7, 5)
    # Multiplying a loss by c > 0 multiplies its gradient by c; standardisation removes it.
    assert torch.allclose(
        standardized_importance(grad * scale), standardized_importance(grad), atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_standardized_importance_is_float32_for_any_gradient_dtype(dtype: torch.dtype) -> None:
    grad = torch.tensor([[0.5, -1.0, 2.0], [0.25, 3.0, -0.75]], dtype=dtype)
    result = standardized_importance(grad)
    assert result.dtype == torch.float32
    assert result.shape == grad.shape
    expected = torch.tensor(_by_hand(grad.double().flatten().tolist())).reshape(2, 3)
    assert torch.allclose(result, expected.float(), atol=1e-6)


def test_standardized_importance_stays_below_one_for_extreme_outliers() -> None:
    grad = torch.zeros(20_000)
    grad[3] = 1.0  # z is about 141: tanh rounds to exactly 1.0 in float32
    result = standardized_importance(grad)
    assert torch.isfinite(result).all()
    assert float(result.max()) < 1.0
    assert float(result[3]) > 0.999


@pytest.mark.parametrize(
    "shape,scale",
    [((3,), 1.0), ((4, 5), 1e-30), ((2, 3, 4), 1e30), ((8, 1, 3, 3), 1e3), ((64, 16), 1e-8)],
)
def test_importance_is_finite_in_unit_interval_and_shaped_like_the_parameter(
    shape: tuple[int, ...], scale: float
) -> None:
    torch.manual_seed(2)
    grad = torch.randn(shape) * scale
    result = standardized_importance(grad)
    assert result.shape == grad.shape
    assert torch.isfinite(result).all()
    assert float(result.min()) >= 0.0
    assert float(result.max()) < 1.0


# ----------------------------------------------------------------------------- the guards
GUARD_CASES = {
    "all_zero": torch.zeros(4, 3),
    "constant": torch.full((5,), 2.5),
    "single_element": torch.tensor([3.0]),
    "nan": torch.tensor([1.0, float("nan"), 2.0, 3.0]),
    "pos_inf": torch.tensor([1.0, float("inf"), 2.0]),
    "neg_inf": torch.tensor([[1.0, 2.0], [float("-inf"), 0.0]]),
    "overflowing_std": torch.tensor([3e38, -3e38, 3e38, -3e38]),
}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_unusable_gradients_give_zeros_never_nan(case: str) -> None:
    grad = GUARD_CASES[case]
    assert not is_usable_gradient(grad)
    result = standardized_importance(grad)
    assert result.shape == grad.shape
    assert result.dtype == torch.float32
    assert torch.equal(result, torch.zeros(grad.shape))


def test_none_gradient_gives_zeros_shaped_like_the_parameter() -> None:
    param = torch.nn.Parameter(torch.randn(3, 2))
    assert not is_usable_gradient(None)
    result = standardized_importance(None, like=param)
    assert torch.equal(result, torch.zeros(3, 2))
    assert result.dtype == torch.float32


def test_ordinary_gradients_are_usable() -> None:
    assert is_usable_gradient(torch.tensor([0.0, 1.0]))
    assert is_usable_gradient(torch.randn(3, 3))


# ------------------------------------------------------------------ max over heads and tasks
def test_max_accumulate_is_elementwise_and_never_decreases() -> None:
    acc = {"w": torch.tensor([0.1, 0.9, 0.5])}
    max_accumulate(acc, {"w": torch.tensor([0.3, 0.2, 0.5]), "b": torch.tensor([0.4])})
    assert torch.equal(acc["w"], torch.tensor([0.3, 0.9, 0.5]))
    assert torch.equal(acc["b"], torch.tensor([0.4]))
    max_accumulate(acc, {"w": torch.zeros(3)})
    assert torch.equal(acc["w"], torch.tensor([0.3, 0.9, 0.5]))


def test_max_accumulate_does_not_alias_the_new_tensor() -> None:
    new = {"w": torch.tensor([0.2, 0.4])}
    acc: dict[str, torch.Tensor] = {}
    max_accumulate(acc, new)
    new["w"].fill_(0.99)
    assert torch.equal(acc["w"], torch.tensor([0.2, 0.4]))


def test_accumulate_importance_takes_max_over_heads_and_previous_tasks() -> None:
    accumulated = {"w": torch.tensor([[0.7, 0.0], [0.0, 0.1]])}
    heads = [
        {"w": torch.tensor([[0.2, 0.6], [0.0, 0.0]])},  # old head
        {"w": torch.tensor([[0.1, 0.3], [0.8, 0.05]])},  # current head
    ]
    accumulate_importance(accumulated, heads)
    assert torch.equal(accumulated["w"], torch.tensor([[0.7, 0.6], [0.8, 0.1]]))


def test_max_accumulate_pads_a_grown_parameter_with_zero_importance() -> None:
    acc = {"w": torch.tensor([[0.5, 0.6]])}
    max_accumulate(acc, {"w": torch.tensor([[0.1, 0.7], [0.2, 0.3]])})
    assert torch.equal(acc["w"], torch.tensor([[0.5, 0.7], [0.2, 0.3]]))


def test_fit_to_shape_pads_with_zeros_and_rejects_a_new_rank() -> None:
    padded = fit_to_shape(torch.tensor([[0.5, 0.25]]), (2, 3))
    assert torch.equal(padded, torch.tensor([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        fit_to_shape(torch.ones(2), (2, 1))


# --------------------------------------------------------------------------- the head rule
def test_head_scale_is_one_minus_mean_over_all_elements_of_all_tensors() -> None:
    importance = {
        "a": torch.tensor([0.5, 0.5]),
        "b": torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
    }
    # (0.5 + 0.5 + 0.9) / 10 = 0.19 -- not the mean of the per-tensor means (0.30625)
    assert math.isclose(head_scale(importance), 0.81, rel_tol=1e-7)  # 0.9 in float32
    assert isinstance(head_scale(importance), float)


def test_head_scale_is_one_without_importance() -> None:
    assert head_scale({}) == 1.0
    assert head_scale({"w": torch.zeros(3, 3)}) == 1.0


# --------------------------------------------------------------------- values out of range
@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25, float("inf")])
def test_max_accumulate_refuses_values_outside_the_unit_interval_and_changes_nothing(
    bad: float,
) -> None:
    """Importance lies in [0, 1) (Section 3.1): a NaN would reach A through the max (and the
    mask 1 - A), a value above 1 would flip gradients. Nothing is folded in, not even the
    entries that come before the bad one."""
    acc = {"w": torch.tensor([0.1, 0.2])}
    with pytest.raises(ValueError, match="'b'"):
        max_accumulate(acc, {"w": torch.tensor([0.9, 0.9]), "b": torch.tensor([0.5, bad])})
    assert set(acc) == {"w"} and torch.equal(acc["w"], torch.tensor([0.1, 0.2]))


def test_max_accumulate_refuses_a_new_rank_before_changing_anything() -> None:
    acc = {"w": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3])}
    with pytest.raises(ValueError, match="'b'"):
        max_accumulate(acc, {"w": torch.tensor([0.9, 0.9]), "b": torch.tensor([[0.5]])})
    assert torch.equal(acc["w"], torch.tensor([0.1, 0.2]))


def test_max_accumulate_keeps_the_accumulated_dtype() -> None:
    acc = {"w": torch.tensor([0.1, 0.2])}
    max_accumulate(acc, {"w": torch.tensor([0.3, 0.0], dtype=torch.float64)})
    assert acc["w"].dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), 2.0, -1.0])
def test_head_scale_refuses_importance_outside_the_unit_interval(bad: float) -> None:
    """1 - mean(A) would be NaN, negative (flipping the heads' gradients) or above 1."""
    with pytest.raises(ValueError, match="'layer.bias'"):
        head_scale({"layer.weight": torch.zeros(3), "layer.bias": torch.tensor([bad, 0.0])})
