"""Soft-masking in ``SPGPlugin.before_update`` (paper Section 3.2, Eq. 4-5; ``docs/algorithm.md``
§2): exact masked gradients, nothing masked
on the first experience, factors fixed per experience, head-gradient clipping, and the effect on
plain SGD (importance 1 freezes a parameter, importance 0 is Naive)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import (
    CallbackProbe,
    GradRecorder,
    make_mlp,
    make_naive,
    snapshot_params,
)
from torch import Tensor, nn

from avalanche_spg import SPGPlugin


def _is_head(name: str) -> bool:
    return name.startswith("classifier.")


def _run_with_recorders(benchmark: Any, n_experiences: int = 3, **plugin_kwargs: Any) -> Any:
    """Train with ``[raw recorder, SPG, masked recorder]`` and record importance/head scale as
    they are at the start of each experience and at every update."""
    model = make_mlp(hidden=(16, 12))
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin(**plugin_kwargs)
    starts: list[tuple[dict[str, Tensor], float]] = []
    during: list[list[tuple[dict[str, Tensor], float]]] = []

    def at_start(strategy: Any) -> None:
        starts.append(({n: v.clone() for n, v in plugin.importance.items()}, plugin.head_scale))
        during.append([])

    def at_update(strategy: Any) -> None:
        during[-1].append(({n: v.clone() for n, v in plugin.importance.items()}, plugin.head_scale))

    probe = CallbackProbe(before_training_exp=at_start, before_update=at_update)
    strategy = make_naive(model, [raw, plugin, masked, probe], train_epochs=2)
    for experience in benchmark.train_stream[:n_experiences]:
        strategy.train(experience)
    return model, plugin, raw, masked, starts, during


def test_masked_gradient_is_exactly_one_minus_importance_times_gradient(
    digits_til_small: Any,
) -> None:
    model, plugin, raw, masked, starts, _ = _run_with_recorders(digits_til_small)
    checked_features = checked_heads = 0
    for exp in (1, 2):
        importance, scale = starts[exp]
        assert importance and 0.0 < scale < 1.0
        # the head rule's scalar: 1 - mean over all elements of all importance tensors
        flat = torch.cat([v.flatten().double() for v in importance.values()])
        assert abs(scale - (1.0 - float(flat.mean()))) < 1e-6
        assert len(raw.records[exp]) == len(masked.records[exp]) > 1
        for before, after in zip(raw.records[exp], masked.records[exp]):
            for name, grad in before.items():
                if grad is None:
                    assert after[name] is None
                    continue
                if _is_head(name):
                    assert torch.equal(after[name], grad * scale), name
                    checked_heads += 1
                else:
                    assert torch.equal(after[name], (1 - importance[name]) * grad), name
                    checked_features += 1
    assert checked_features > 0 and checked_heads > 0
    # the mask really changed something (not a vacuous identity)
    name = "features.1.weight"
    assert not torch.equal(raw.records[1][0][name], masked.records[1][0][name])


def test_nothing_is_masked_on_the_first_experience(digits_til_small: Any) -> None:
    _, plugin, raw, masked, starts, _ = _run_with_recorders(digits_til_small, n_experiences=1)
    assert starts[0] == ({}, 1.0)
    assert len(raw.records[0]) > 1
    for before, after in zip(raw.records[0], masked.records[0]):
        for name, grad in before.items():
            if grad is None:
                assert after[name] is None
            else:
                assert torch.equal(after[name], grad), name


def test_importance_and_head_scale_are_fixed_within_an_experience(digits_til_small: Any) -> None:
    _, plugin, raw, masked, starts, during = _run_with_recorders(digits_til_small)
    for exp in (1, 2):
        importance, scale = starts[exp]
        assert len(during[exp]) > 1
        for seen_importance, seen_scale in during[exp]:
            assert seen_scale == scale
            assert set(seen_importance) == set(importance)
            for name, value in importance.items():
                assert torch.equal(seen_importance[name].cpu(), value.cpu())
        # and the factor applied at the last update is the one of the first
        last_before, last_after = raw.records[exp][-1], masked.records[exp][-1]
        for name, value in importance.items():
            assert torch.equal(last_after[name], (1 - value) * last_before[name])


def test_the_training_loss_has_no_old_head_term(digits_til_small: Any) -> None:
    """The old heads' logit sum belongs to the importance pass only (paper Section 3.1), never to
    the training loss."""
    mismatches: list[float] = []

    def check(strategy: Any) -> None:
        expected = nn.functional.cross_entropy(strategy.mb_output, strategy.mb_y)
        mismatches.append(float((strategy.loss - expected).abs().detach()))

    model = make_mlp()
    strategy = make_naive(model, [SPGPlugin(), CallbackProbe(before_update=check)])
    for experience in digits_til_small.train_stream[:3]:
        strategy.train(experience)
    assert mismatches and max(mismatches) == 0.0


def _two_experience_run_with_loss_scale(
    benchmark: Any, loss_scale: float, **plugin_kwargs: Any
) -> tuple[list[dict[str, Tensor | None]], list[dict[str, Tensor | None]], float]:
    """Experience 0 normally, experience 1 with a huge loss (huge head gradients)."""
    model = make_mlp()
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin(**plugin_kwargs)
    scale = {"value": 1.0}

    def criterion(out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, y) * scale["value"]

    strategy = make_naive(model, [raw, plugin, masked], lr=0.0, criterion=criterion)
    strategy.train(benchmark.train_stream[0])
    head_scale = plugin.head_scale  # the scalar applied during experience 1
    scale["value"] = loss_scale
    strategy.train(benchmark.train_stream[1])
    return raw.records[1], masked.records[1], head_scale


def _head_norm(grads: dict[str, Tensor | None]) -> float:
    return float(
        torch.linalg.vector_norm(
            torch.cat([g.flatten() for n, g in grads.items() if _is_head(n) and g is not None])
        )
    )


def test_head_gradients_are_clipped_to_1e4_by_default(digits_til_small: Any) -> None:
    raw, masked, scale = _two_experience_run_with_loss_scale(digits_til_small, 1e8)
    assert _head_norm(raw[0]) > 1e5
    for after in masked:
        # clipped to norm 1e4, then scaled by the head rule
        assert abs(_head_norm(after) - 1e4 * scale) <= 1e-3 * 1e4 * scale
    # feature gradients are not clipped, only masked
    assert any(
        float(g.abs().max()) > 1e4
        for n, g in masked[0].items()
        if not _is_head(n) and g is not None
    )


def test_head_clipping_is_off_with_none(digits_til_small: Any) -> None:
    raw, masked, scale = _two_experience_run_with_loss_scale(
        digits_til_small, 1e8, clip_head_grad_norm=None
    )
    assert _head_norm(raw[0]) > 1e5
    for before, after in zip(raw, masked):
        for name, grad in before.items():
            if _is_head(name) and grad is not None:
                assert torch.equal(after[name], grad * scale), name


def _train_second_experience(
    benchmark: Any, importance_of: dict[str, float] | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train experience 0 with Naive, then experience 1 from the same state and seed either
    with Naive (``importance_of is None``) or with an SPGPlugin whose importance is loaded:
    ``{name: constant}`` for the feature parameters. Returns (before, after) parameters."""
    model = make_mlp(hidden=(16,))
    make_naive(model).train(benchmark.train_stream[0])
    model = copy.deepcopy(model)
    plugins = []
    if importance_of is not None:
        plugin = SPGPlugin()
        state = plugin.state_dict()
        params = dict(model.named_parameters())
        state["importance"] = {n: torch.full_like(params[n], v) for n, v in importance_of.items()}
        state["seen_tasks"] = [0]
        state["experiences_seen"] = 1
        plugin.load_state_dict(state)
        plugins.append(plugin)
    strategy = make_naive(model, plugins, lr=0.2, train_epochs=2)
    before = snapshot_params(model)
    torch.manual_seed(11)
    strategy.train(benchmark.train_stream[1])
    return before, snapshot_params(model)


def test_importance_one_freezes_a_parameter_under_plain_sgd(digits_til_small: Any) -> None:
    before, after = _train_second_experience(
        digits_til_small, {"features.1.weight": 1.0, "features.1.bias": 0.0}
    )
    assert torch.equal(after["features.1.weight"], before["features.1.weight"])
    assert not torch.equal(after["features.1.bias"], before["features.1.bias"])


def test_importance_zero_trains_exactly_like_naive(digits_til_small: Any) -> None:
    _, naive = _train_second_experience(digits_til_small, None)
    _, spg = _train_second_experience(
        digits_til_small, {"features.1.weight": 0.0, "features.1.bias": 0.0}
    )
    assert set(naive) == set(spg)
    for name in naive:
        assert torch.equal(spg[name], naive[name]), name


def test_state_loaded_during_an_experience_masks_the_following_steps(
    digits_til_small: Any,
) -> None:
    """``load_state_dict`` in the middle of an experience never leaves a step unmasked: the
    next update uses the loaded importance (1 freezes a parameter under plain SGD, 0 not)."""
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    strategy.train(digits_til_small.train_stream[0])
    state = plugin.state_dict()
    state["importance"] = {
        "features.1.weight": torch.ones(16, 64),
        "features.1.bias": torch.zeros(16),
    }
    at_load: dict[str, Tensor] = {}

    def load_after_first_iteration(strategy: Any) -> None:
        if strategy.clock.train_exp_iterations == 1 and not at_load:
            plugin.load_state_dict(state)
            at_load.update(snapshot_params(model))

    strategy.plugins.append(CallbackProbe(after_training_iteration=load_after_first_iteration))
    strategy.train(digits_til_small.train_stream[1])
    assert at_load
    after = snapshot_params(model)
    assert torch.equal(after["features.1.weight"], at_load["features.1.weight"])
    assert not torch.equal(after["features.1.bias"], at_load["features.1.bias"])


def test_build_masks_returns_the_aligned_importance_and_leaves_its_input_alone() -> None:
    """Mask building is a function: the importance it is given is not touched; the aligned
    copy (grown parameter padded with 0) and the head scale come back with the masks."""
    from avalanche_spg.masking import build_masks

    weight = nn.Parameter(torch.ones(3, 2))  # grew from 2 to 3 rows
    head = nn.Parameter(torch.ones(4))
    given = {"w": torch.tensor([[0.5, 0.25], [0.0, 1.0]])}
    kept = given["w"].clone()
    masks, aligned, scale = build_masks(
        given, {"w": weight}, {"h": head}, head_rule="mean", clip_head_grad_norm=None
    )
    assert given.keys() == {"w"} and torch.equal(given["w"], kept)
    assert torch.equal(aligned["w"], torch.tensor([[0.5, 0.25], [0.0, 1.0], [0.0, 0.0]]))
    assert scale == 1.0 - 1.75 / 6
    assert masks is not None
    assert torch.equal(masks.feature_factors[0], 1.0 - aligned["w"])
    assert masks.head_params == [head] and masks.head_scale == scale
    with pytest.raises(ValueError, match=r"'w': importance \(3, 2\), parameter \(2, 2\)"):
        build_masks(
            {"w": torch.zeros(3, 2)},
            {"w": nn.Parameter(torch.ones(2, 2))},
            {},
            head_rule="mean",
            clip_head_grad_norm=None,
        )
