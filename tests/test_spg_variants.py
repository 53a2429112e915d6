"""The documented SPG variants (``head_rule``, ``previous_heads``): the defaults are the paper's
method unchanged, and each variant does exactly what its documentation says; plus their
reach from the benchmark suite (``--hparam spg.head_rule=none``, ``spg+lwf``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import (
    GradRecorder,
    make_mlp,
    make_naive,
    reference_accumulate,
    reference_gamma,
)
from torch import Tensor

from avalanche_spg import SPGPlugin

MB = 32


def _train_three(benchmark: Any, **kwargs: Any) -> tuple[Any, SPGPlugin, GradRecorder, Any]:
    """Three experiences with ``[raw recorder, SPG, masked recorder]``; also returns the
    importance and head scale that the third experience trained with."""
    model = make_mlp(hidden=(16, 12))
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin(**kwargs)
    strategy = make_naive(model, [raw, plugin, masked], train_mb_size=MB)
    used: list[Any] = []
    for experience in benchmark.train_stream[:3]:
        used.append((plugin.importance, plugin.head_scale))
        strategy.train(experience)
    return model, plugin, raw, (masked, *used[2])


def test_defaults_are_the_papers_rule_bit_for_bit(digits_til_small: Any) -> None:
    torch.manual_seed(0)
    model_default, plugin_default, _, _ = _train_three(digits_til_small)
    torch.manual_seed(0)
    model_paper, plugin_paper, _, _ = _train_three(
        digits_til_small, head_rule="mean", previous_heads=True
    )
    for name, value in plugin_default.importance.items():
        assert torch.equal(value, plugin_paper.importance[name]), name
    for (name, a), (_, b) in zip(model_default.named_parameters(), model_paper.named_parameters()):
        assert torch.equal(a, b), name
    flat = torch.cat([v.flatten().double() for v in plugin_default.importance.values()])
    assert plugin_default.head_scale == pytest.approx(1.0 - float(flat.mean()), abs=1e-12)
    assert plugin_default.head_scale < 0.95  # the rule is active, not a trivial 1


def test_head_rule_none_leaves_head_gradients_unscaled_and_still_masks_features(
    digits_til_small: Any,
) -> None:
    _, plugin, raw, (masked, importance, scale) = _train_three(digits_til_small, head_rule="none")
    assert plugin.head_scale == 1.0 and scale == 1.0
    assert importance and max(float(v.max()) for v in importance.values()) > 0.5
    checked_heads = checked_features = 0
    for before, after in zip(raw.records[2], masked.records[2]):
        for name, g in before.items():
            if g is None:
                continue
            if name.startswith("classifier."):
                assert torch.equal(after[name], g), name  # clip never fires at these norms
                checked_heads += 1
            else:
                expected = g * (1.0 - importance[name])
                assert torch.equal(after[name], expected), name
                checked_features += 1
    assert checked_heads and checked_features


def test_previous_heads_false_uses_only_the_current_heads_loss(digits_til: Any) -> None:
    model = make_mlp(hidden=(24, 16))
    plugin = SPGPlugin(previous_heads=False)
    strategy = make_naive(model, [plugin], train_mb_size=MB, train_epochs=2)
    expected: dict[str, Tensor] = {}
    with_old_heads: dict[str, Tensor] = {}
    seen: list[int] = []
    for experience in digits_til.train_stream[:3]:
        strategy.train(experience)
        (task,) = experience.task_labels
        data = experience.dataset.train()
        reference_accumulate(expected, reference_gamma(model, data, [], task, MB))
        reference_accumulate(with_old_heads, reference_gamma(model, data, seen, task, MB))
        seen.append(task)
    actual = plugin.importance
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert float(value.max()) > 0.5, name  # not a comparison of zeros
        assert float((actual[name] - value).abs().max()) <= 1e-5, name
    # ... and the variant really differs from the paper's importance on these data.
    assert any(float((actual[n] - with_old_heads[n]).abs().max()) > 1e-3 for n in expected)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"head_rule": "bogus"}, "'bogus'"),
        ({"head_rule": None}, "None"),
        ({"previous_heads": "yes"}, "'yes'"),
        ({"previous_heads": 1}, "1"),
    ],
)
def test_variant_arguments_are_validated(kwargs: dict[str, Any], fragment: str) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name) as info:
        SPGPlugin(**kwargs)
    assert fragment in str(info.value)


def test_benchmark_hparams_reach_the_variants_and_spg_lwf_stacks_both_plugins() -> None:
    from avalanche.training.plugins import LwFPlugin

    from benchmarks.methods import StrategyContext, build_strategy, method_hparams, parse_hparams

    overrides = parse_hparams(
        ["spg+lwf.head_rule='none'", "spg+lwf.previous_heads=False", "spg+lwf.alpha=0.5"]
    )
    hp = method_hparams("spg+lwf", "split-digits", overrides)
    ctx = StrategyContext(
        model=make_mlp(),
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        train_mb_size=8,
        train_epochs=1,
        eval_mb_size=8,
        device="cpu",
        evaluator=None,
        n_tasks=5,
        source="digits",
    )
    strategy = build_strategy("spg+lwf", ctx, hp)
    kinds = [type(p) for p in strategy.plugins]
    assert kinds.index(LwFPlugin) < kinds.index(SPGPlugin)  # LwF's loss term is then masked
    (spg,) = [p for p in strategy.plugins if isinstance(p, SPGPlugin)]
    (lwf,) = [p for p in strategy.plugins if isinstance(p, LwFPlugin)]
    assert spg.head_rule == "none" and spg.previous_heads is False
    assert lwf.lwf.alpha == 0.5
