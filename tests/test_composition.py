"""SPGPlugin composed with Avalanche's evaluation, replay, regularisation, scheduling and
early-stopping plugins, and with other strategies given ``plugins=[SPGPlugin()]``."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training import EWC, Cumulative, LwF, Replay
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EvaluationPlugin,
    EWCPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
)
from helpers import (
    CallbackProbe,
    GradRecorder,
    feature_param_names,
    make_mlp,
    make_naive,
    reference_accumulate,
    reference_gamma,
    snapshot_params,
)
from torch import Tensor, nn

from avalanche_spg import SPGPlugin
from avalanche_spg.compat import SPGCompatibilityError, SPGCompatibilityWarning

N_EXPERIENCES = 3


def _assert_importance_valid(plugin: SPGPlugin, model: nn.Module) -> None:
    importance = plugin.importance
    assert importance, "importance is empty"
    assert set(importance) == feature_param_names(model)
    for name, value in importance.items():
        assert torch.isfinite(value).all(), name
        assert float(value.min()) >= 0.0 and float(value.max()) < 1.0, name
    assert float(max(v.max() for v in importance.values())) > 0.0


def _assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], tol: float) -> float:
    assert set(actual) == set(expected)
    worst = max(float((actual[n].cpu() - expected[n]).abs().max()) for n in expected)
    assert worst <= tol, f"max abs difference {worst:.3g}"
    return worst


# ------------------------------------------------------------------------------- evaluation
def test_evaluation_plugin_accuracy_forgetting_and_bwt(digits_til_small: Any) -> None:
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=[],
    )
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin], evaluator=evaluator, train_epochs=2)
    for experience in digits_til_small.train_stream[:N_EXPERIENCES]:
        strategy.train(experience)
        results = strategy.eval(digits_til_small.test_stream[:N_EXPERIENCES])
    for prefix in (
        "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000",
        "Top1_Acc_Stream/eval_phase/test_stream",
        "ExperienceForgetting/eval_phase/test_stream/Task000/Exp000",
        "StreamForgetting/eval_phase/test_stream",
        "ExperienceBWT/eval_phase/test_stream/Task000/Exp000",
        "StreamBWT/eval_phase/test_stream",
    ):
        keys = [k for k in results if k.startswith(prefix)]
        assert keys, f"missing metric {prefix}"
        assert all(math.isfinite(float(results[k])) for k in keys)
    assert float(results["Top1_Acc_Stream/eval_phase/test_stream/Task002"]) > 0.5
    _assert_importance_valid(plugin, model)


# ------------------------------------------------------------------------ other plugins
PluginFactory = Callable[[nn.Module, torch.optim.Optimizer], list[Any]]

OTHER_PLUGINS: dict[str, PluginFactory] = {
    # the other plugin first (user order) and after SPG
    "replay_first": lambda m, o: [ReplayPlugin(mem_size=40), SPGPlugin()],
    "replay_after": lambda m, o: [SPGPlugin(), ReplayPlugin(mem_size=40)],
    "lwf": lambda m, o: [LwFPlugin(alpha=1.0, temperature=2.0), SPGPlugin()],
    "ewc": lambda m, o: [EWCPlugin(ewc_lambda=10.0), SPGPlugin()],
    "lr_scheduler": lambda m, o: [
        LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)),
        SPGPlugin(),
    ],
}


@pytest.mark.parametrize("name", sorted(OTHER_PLUGINS))
def test_spg_composes_with_avalanche_plugins(digits_til_small: Any, name: str) -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plugins = OTHER_PLUGINS[name](model, optimizer)
    (plugin,) = [p for p in plugins if isinstance(p, SPGPlugin)]
    strategy = make_naive(model, plugins, optimizer=optimizer, train_epochs=2)
    history = []
    for experience in digits_til_small.train_stream[:N_EXPERIENCES]:
        strategy.train(experience)
        history.append(plugin.importance)
    assert plugin.seen_tasks == list(range(N_EXPERIENCES))
    _assert_importance_valid(plugin, model)
    for before, after in zip(history, history[1:]):
        assert all((after[n] >= before[n]).all() for n in before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_replay_importance_uses_only_the_experience_own_data(digits_til_small: Any) -> None:
    """With a replay buffer the training loader mixes old samples in; the importance pass must
    still run over the current experience's training set only (paper Section 3.1;
    ``docs/algorithm.md`` §1)."""
    model = make_mlp(hidden=(16,))
    plugin = SPGPlugin()
    strategy = make_naive(model, [ReplayPlugin(mem_size=60), plugin])
    expected: dict[str, Tensor] = {}
    seen: list[int] = []
    for experience in digits_til_small.train_stream[:N_EXPERIENCES]:
        strategy.train(experience)
        (task,) = experience.task_labels
        dataset = experience.dataset.train()
        reference_accumulate(expected, reference_gamma(model, dataset, seen, task, 32))
        seen.append(task)
    _assert_close(plugin.importance, expected, 1e-5)


@pytest.mark.parametrize("strategy_name", ["Replay", "LwF", "EWC", "Cumulative"])
def test_other_strategies_with_spg_plugin(digits_til_small: Any, strategy_name: str) -> None:
    model = make_mlp(hidden=(16,))
    plugin = SPGPlugin()
    extra: dict[str, Any] = {
        "Replay": {"strategy_cls": Replay, "mem_size": 40},
        "LwF": {"strategy_cls": LwF, "alpha": 1.0, "temperature": 2.0},
        "EWC": {"strategy_cls": EWC, "ewc_lambda": 10.0},
        "Cumulative": {"strategy_cls": Cumulative},
    }[strategy_name]
    strategy = make_naive(model, [plugin], **extra)
    expected: dict[str, Tensor] = {}
    seen: list[int] = []
    for experience in digits_til_small.train_stream[:N_EXPERIENCES]:
        strategy.train(experience)
        (task,) = experience.task_labels
        dataset = experience.dataset.train()
        reference_accumulate(expected, reference_gamma(model, dataset, seen, task, 32))
        seen.append(task)
    _assert_importance_valid(plugin, model)
    assert plugin.seen_tasks == list(range(N_EXPERIENCES))
    # Replay and Cumulative train on more than the experience; importance still uses only it
    _assert_close(plugin.importance, expected, 1e-5)


# ------------------------------------------------------------------------- early stopping
def test_importance_is_computed_on_the_weights_restored_by_early_stopping(
    digits_til_small: Any,
) -> None:
    last_trained: dict[str, Tensor] = {}

    def remember(strategy: Any) -> None:
        last_trained.clear()
        last_trained.update(snapshot_params(strategy.model))

    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    # mode="min" on accuracy: the (worse) weights after the first epoch are "best", so the
    # plugin restores them once accuracy improves -- a guaranteed restore.
    early_stopping = EarlyStoppingPlugin(
        patience=1, val_stream_name="test_stream", metric_name="Top1_Acc_Stream", mode="min"
    )
    model = make_mlp(hidden=(16,))
    plugin = SPGPlugin()
    strategy = make_naive(
        model,
        [early_stopping, plugin, CallbackProbe(after_training_iteration=remember)],
        evaluator=evaluator,
        train_epochs=6,
        eval_every=1,
        lr=0.2,
    )
    experience = digits_til_small.train_stream[0]
    strategy.train(experience, eval_streams=[digits_til_small.test_stream[:1]])
    final = snapshot_params(model)
    assert any(not torch.equal(final[n], last_trained[n]) for n in final), "no restore happened"
    dataset = experience.dataset.train()
    on_final = reference_gamma(model, dataset, [], 0, 32)
    _assert_close(plugin.importance, on_final, 1e-5)
    last_model = copy.deepcopy(model)
    last_model.load_state_dict(last_trained, strict=False)
    on_last = reference_gamma(last_model, dataset, [], 0, 32)
    assert max(float((on_last[n] - on_final[n]).abs().max()) for n in on_final) > 1e-3


# ------------------------------------------------------------------- one SPG per strategy
def _two_spg_entries() -> dict[str, Callable[[], list[Any]]]:
    def same_plugin_twice() -> list[Any]:
        plugin = SPGPlugin()
        return [plugin, plugin]

    return {
        "same_plugin_twice": same_plugin_twice,
        "two_plugins": lambda: [SPGPlugin(), SPGPlugin(mask="update")],
    }


@pytest.mark.parametrize("case", sorted(_two_spg_entries()))
def test_two_spg_entries_on_one_strategy_are_refused_before_training(
    digits_til_small: Any, case: str
) -> None:
    """Two entries would mask every gradient by (1 - A)^2; refused before any step."""
    model = make_mlp()
    probe = GradRecorder()
    strategy = make_naive(model, [probe, *_two_spg_entries()[case]()])
    before = snapshot_params(model)
    with pytest.raises(SPGCompatibilityError, match=r"2 times .*\(1 - A\)\^2"):
        strategy.train(digits_til_small.train_stream[0])
    assert probe.records == []  # not even before_training_exp ran
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items())


def test_a_criterion_spg_does_not_recognise_warns_once(digits_til_small: Any) -> None:
    """Importance uses cross-entropy whatever the training loss: one warning says so."""

    def smoothed(output: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(output, target, label_smoothing=0.1)

    strategy = make_naive(make_mlp(), [SPGPlugin()], criterion=smoothed)
    with pytest.warns(SPGCompatibilityWarning, match="smoothed") as record:
        for experience in digits_til_small.train_stream[:2]:
            strategy.train(experience)
    assert sum(issubclass(w.category, SPGCompatibilityWarning) for w in record) == 1


@pytest.mark.parametrize(
    "criterion",
    [nn.CrossEntropyLoss(), nn.functional.cross_entropy],
    ids=["CrossEntropyLoss", "functional"],
)
def test_cross_entropy_criteria_train_without_a_compatibility_warning(
    digits_til_small: Any, criterion: Any
) -> None:
    strategy = make_naive(make_mlp(), [SPGPlugin()], criterion=criterion)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SPGCompatibilityWarning)
        strategy.train(digits_til_small.train_stream[0])


class _TupleOutput(nn.Module):
    """Wraps a model so that it returns ``(logits, logits)``: not class logits for SPG."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.inner(x, torch.zeros(len(x), dtype=torch.long))
        return logits, logits


@pytest.mark.parametrize("output", ["tuple", "one number per sample"])
def test_an_output_that_is_not_class_logits_is_refused_before_the_first_step(
    digits_til_small: Any, output: str
) -> None:
    """The criterion copes with the output (so training itself would run), the importance
    pass cannot: it used to fail with a TypeError once the experience had trained."""
    if output == "tuple":
        model: nn.Module = _TupleOutput(make_mlp())

        def criterion(out: Any, target: Tensor) -> Tensor:
            return nn.functional.cross_entropy(out[0], target)
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))

        def criterion(out: Any, target: Tensor) -> Tensor:
            return nn.functional.mse_loss(out, target.float())

    before = snapshot_params(model)
    strategy = make_naive(model, [SPGPlugin()], criterion=criterion)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SPGCompatibilityWarning)
        with pytest.raises(SPGCompatibilityError, match="not class logits"):
            strategy.train(digits_til_small.train_stream[0])
    after = snapshot_params(model)
    assert all(torch.equal(after[n], v) for n, v in before.items())
