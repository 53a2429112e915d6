"""The importance pass inside ``SPGPlugin.after_training_exp`` (paper Section 3.1), checked against
an independent reference implementation written in ``tests/helpers.py`` and on its side
effects: private DataLoader, train/eval flags, zeroed gradients, float32 for a bfloat16 model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from helpers import (
    CallbackProbe,
    CastingMultiHeadMLP,
    feature_param_names,
    make_mlp,
    make_naive,
    reference_accumulate,
    reference_gamma,
)
from torch import Tensor, nn

from avalanche_spg import SPGPlugin

MB = 32  # training minibatch size; experiences of digits are not multiples of it


def _assert_importance_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        diff = float((actual[name].float().cpu() - value).abs().max())
        assert diff <= 1e-5, f"{name}: max abs difference {diff:.3g}"


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_importance_matches_independent_reference_after_three_experiences(
    digits_til: Any, method: str
) -> None:
    model = make_mlp(hidden=(24, 16))  # no dropout: the pass is deterministic
    plugin = SPGPlugin(importance_method=method)
    strategy = make_naive(model, [plugin], train_mb_size=MB, train_epochs=2)
    expected: dict[str, Tensor] = {}
    seen: list[int] = []
    sizes: list[int] = []
    for experience in digits_til.train_stream[:3]:
        strategy.train(experience)
        (task,) = experience.task_labels
        gamma = reference_gamma(model, experience.dataset.train(), seen, task, MB)
        reference_accumulate(expected, gamma)
        seen.append(task)
        sizes.append(len(experience.dataset))
    assert any(size % MB for size in sizes)  # the smaller last minibatch is exercised
    # Guard against a vacuous comparison: every layer got a real, non-trivial importance.
    for name, value in expected.items():
        assert float(value.max()) > 0.5, name
    _assert_importance_close(plugin.importance, expected)
    assert plugin.seen_tasks == [0, 1, 2]


def test_fast_and_reference_methods_agree_without_dropout(digits_til_small: Any) -> None:
    results = []
    for method in ("reference", "fast"):
        model = make_mlp(hidden=(16,), seed=3)
        plugin = SPGPlugin(importance_method=method, importance_pass_batch_size=50)
        strategy = make_naive(model, [plugin], train_mb_size=16)
        for experience in digits_til_small.train_stream[:3]:
            torch.manual_seed(7)
            strategy.train(experience)
        results.append(plugin.importance)
    _assert_importance_close(results[1], results[0])


def test_importance_in_unit_interval_finite_shaped_and_monotone(digits_til: Any) -> None:
    model = make_mlp(hidden=(16, 16), dropout=0.2)
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin], train_mb_size=MB)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    history: list[dict[str, Tensor]] = []
    for experience in digits_til.train_stream:
        strategy.train(experience)
        importance = plugin.importance
        assert set(importance) == feature_param_names(model)
        for name, value in importance.items():
            assert value.shape == shapes[name]
            assert value.dtype == torch.float32
            assert torch.isfinite(value).all()
            assert float(value.min()) >= 0.0 and float(value.max()) < 1.0
        history.append({n: v.clone() for n, v in importance.items()})
    for before, after in zip(history, history[1:]):
        for name in before:
            assert (after[name] >= before[name]).all(), name
    # it does grow: some element got more important after the first experience
    assert any((history[-1][n] > history[0][n]).any() for n in history[0])


def test_training_gradients_do_not_leak_into_the_pass(digits_til_small: Any) -> None:
    """Gradients left in ``.grad`` by training must not enter the per-head sums (the pass zeroes
    them first: ``docs/algorithm.md``, section 4)."""

    def pollute(strategy: Any) -> None:
        for p in strategy.model.parameters():
            p.grad = torch.full_like(p, 1e3) * torch.randn_like(p)

    model = make_mlp(hidden=(16,))
    plugin = SPGPlugin()
    strategy = make_naive(model, [CallbackProbe(after_training_exp=pollute), plugin])
    experience = digits_til_small.train_stream[0]
    strategy.train(experience)
    expected = reference_gamma(model, experience.dataset.train(), [], 0, MB)
    _assert_importance_close(plugin.importance, expected)


def test_importance_uses_the_experience_training_data_not_the_strategy_loader(
    digits_til_small: Any,
) -> None:
    seen: dict[str, Any] = {}

    def before(strategy: Any) -> None:
        seen["loader"] = strategy.dataloader
        seen["adapted"] = strategy.adapted_dataset

    def after(strategy: Any) -> None:
        assert strategy.dataloader is seen["loader"]
        assert strategy.adapted_dataset is seen["adapted"]
        seen["checked"] = seen.get("checked", 0) + 1

    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(
        model,
        [CallbackProbe(after_training_exp=before), plugin, CallbackProbe(after_training_exp=after)],
    )
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    assert seen["checked"] == 2


@pytest.mark.parametrize("partly_eval", [False, True])
def test_pass_runs_in_train_mode_and_restores_every_module_flag(
    digits_til_small: Any, partly_eval: bool
) -> None:
    """A model found entirely in eval mode runs the pass in train mode (dropout active, as the
    paper); a model the strategy trains partly in eval mode (as AR1 freezes lower layers) keeps
    its flags during the pass. Either way every flag is restored afterwards."""
    model = make_mlp(hidden=(16, 16), dropout=0.3)
    modes_during_pass: list[dict[str, bool]] = []
    pattern: dict[str, bool] = {}

    def set_flags(strategy: Any) -> None:
        strategy.model.eval()
        if partly_eval:
            strategy.model.features[1].train()  # one Linear in train mode, the rest in eval
            strategy.model.features[3].train()
        pattern.update({n: m.training for n, m in strategy.model.named_modules()})
        modes_during_pass.clear()

    def check_flags(strategy: Any) -> None:
        assert {n: m.training for n, m in strategy.model.named_modules()} == pattern

    hook = model.features.register_forward_pre_hook(
        lambda module, args: modes_during_pass.append(
            {n: m.training for n, m in model.named_modules()}
        )
    )
    plugin = SPGPlugin()
    strategy = make_naive(
        model,
        [
            CallbackProbe(after_training_exp=set_flags),
            plugin,
            CallbackProbe(after_training_exp=check_flags),
        ],
    )
    strategy.train(digits_til_small.train_stream[0])
    strategy.train(digits_til_small.train_stream[1])
    hook.remove()
    assert modes_during_pass
    if partly_eval:
        assert all(modes == pattern for modes in modes_during_pass)
        assert any(not flag for flag in pattern.values())
    else:
        assert not any(pattern.values())
        assert all(all(modes.values()) for modes in modes_during_pass)  # dropout active


def test_gradients_are_zero_after_the_pass(digits_til_small: Any) -> None:
    grads_after: list[list[Tensor | None]] = []

    def record(strategy: Any) -> None:
        grads_after.append([p.grad for p in strategy.model.parameters()])

    model = make_mlp()
    strategy = make_naive(model, [SPGPlugin(), CallbackProbe(after_training_exp=record)])
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    assert len(grads_after) == 2
    for grads in grads_after:
        assert all(g is None or not g.any() for g in grads)


def test_importance_is_float32_for_a_bfloat16_model(digits_til_small: Any) -> None:
    model = CastingMultiHeadMLP(hidden=16)
    model.features.to(torch.bfloat16)  # heads stay float32 (Avalanche creates them so)
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    for experience in digits_til_small.train_stream[:2]:
        strategy.train(experience)
    importance = plugin.importance
    assert set(importance) == {"features.0.weight", "features.0.bias"}
    for name, value in importance.items():
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
        assert float(value.max()) < 1.0 and float(value.max()) > 0.0
        assert value.shape == dict(model.named_parameters())[name].shape
    assert all(p.dtype == torch.bfloat16 for p in model.features.parameters())


def test_importance_batch_size_defaults_to_the_training_minibatch(digits_til_small: Any) -> None:
    """The sum of per-minibatch means depends on the minibatch size: the default must be the
    strategy's ``train_mb_size`` (the reference sums its training minibatches)."""
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin], train_mb_size=10)
    experience = digits_til_small.train_stream[0]
    strategy.train(experience)
    snapshot = copy.deepcopy(model)
    expected = reference_gamma(snapshot, experience.dataset.train(), [], 0, 10)
    _assert_importance_close(plugin.importance, expected)
    other = reference_gamma(snapshot, experience.dataset.train(), [], 0, 64)
    assert any((other[n] - expected[n]).abs().max() > 1e-4 for n in expected)


class _BatchNormNet(MultiTaskModule):
    """A multi-head MLP with batch norm in the feature extractor."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = MultiHeadClassifier(16, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.features(x), task_label)


def _state_around_the_pass(benchmark: Any, method: str) -> list[tuple[dict, dict]]:
    pairs: list[tuple[dict, dict]] = []

    def before(strategy: Any) -> None:
        pairs.append(({k: v.clone() for k, v in strategy.model.state_dict().items()}, {}))

    def after(strategy: Any) -> None:
        pairs[-1][1].update({k: v.clone() for k, v in strategy.model.state_dict().items()})

    strategy = make_naive(
        _BatchNormNet(),
        [
            CallbackProbe(after_training_exp=before),
            SPGPlugin(importance_method=method),
            CallbackProbe(after_training_exp=after),
        ],
    )
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    return pairs


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_pass_leaves_the_parameters_unchanged(digits_til_small: Any, method: str) -> None:
    for before, after in _state_around_the_pass(digits_til_small, method):
        params = [k for k in before if "running" not in k and "num_batches" not in k]
        assert params
        for key in params:
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_pass_leaves_batch_norm_statistics_unchanged(digits_til_small: Any, method: str) -> None:
    for before, after in _state_around_the_pass(digits_til_small, method):
        for key in before:
            assert torch.equal(after[key], before[key]), key


class _DictHeadsNet(MultiTaskModule):
    """Task heads in a plain ``nn.ModuleDict`` (no Avalanche classifier to tap)."""

    def __init__(self, n_tasks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU())
        self.task_heads = nn.ModuleDict({str(t): nn.Linear(12, 2) for t in range(n_tasks)})

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.task_heads[str(task_label)](self.features(x))


@pytest.mark.parametrize("method", ["reference", "fast"])
def test_custom_heads_without_avalanche_classifier_match_the_reference(
    digits_til_small: Any, method: str
) -> None:
    model = _DictHeadsNet()
    plugin = SPGPlugin(heads=["task_heads"], importance_method=method)
    strategy = make_naive(model, [plugin])
    expected: dict[str, Tensor] = {}
    names = {"features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    seen: list[int] = []
    for experience in digits_til_small.train_stream[:3]:
        strategy.train(experience)
        (task,) = experience.task_labels
        gamma = reference_gamma(model, experience.dataset.train(), seen, task, MB, names)
        reference_accumulate(expected, gamma)
        seen.append(task)
    _assert_importance_close(plugin.importance, expected)
