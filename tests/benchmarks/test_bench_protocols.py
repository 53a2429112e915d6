"""The training protocols: the paper protocol's schedule plugin (fresh lr per task, plateau
decay, early stop at the lr floor, best-weight restore before SPG's importance pass), the
backbones, and the tensor minibatches that must not change what is evaluated."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

from avalanche_spg import SPGPlugin
from avalanche_spg.models import AlexNetLike, MultiHeadMLP
from benchmarks.data import build_stream, make_benchmark
from benchmarks.methods import StrategyContext, build_strategy
from benchmarks.plugins import PlateauEarlyStopping, TensorDataPlugin
from benchmarks.protocols import PAPER_DROPOUT, make_backbone, protocol_settings
from benchmarks.runner import RunSpec, run_one


class _Recorder(SupervisedPlugin):
    """Records the lr of every epoch, the weights after every epoch and at the end of the
    experience (where SPGPlugin would compute importance)."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []
        self.epoch_states: list[dict[str, torch.Tensor]] = []
        self.final_states: list[dict[str, torch.Tensor]] = []

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.epoch_states.append(copy.deepcopy(strategy.model.state_dict()))

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.final_states.append(copy.deepcopy(strategy.model.state_dict()))


@pytest.fixture(scope="module")
def small_stream() -> Any:
    return build_stream("split-digits", seed=0, max_train_per_task=40, validation_fraction=0.25)


def _strategy(stream: Any, plugins: list[Any], epochs: int) -> SupervisedTemplate:
    model = MultiHeadMLP(64, (16,), initial_out_features=2)
    return SupervisedTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.25),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=16,
        train_epochs=epochs,
        eval_mb_size=64,
        plugins=plugins,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )


def _validation(stream: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    return {t: (task.x_valid, task.y_valid) for t, task in enumerate(stream.tasks)}


def test_plateau_decay_early_stop_and_best_weight_restore(
    small_stream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scripted validation losses: the best epoch is the 2nd, then nothing improves.
    losses = iter([1.0, 0.5] + [0.9] * 200)
    plateau = PlateauEarlyStopping(_validation(small_stream), lr=0.25)
    monkeypatch.setattr(plateau, "validation_loss", lambda strategy: next(losses))
    recorder = _Recorder()
    strategy = _strategy(small_stream, [plateau, recorder], epochs=100)
    strategy.train(make_benchmark(small_stream).train_stream[0])

    epochs = plateau.history[0]["epochs"]
    assert epochs == len(recorder.epoch_states) < 100  # stopped early
    # (Avalanche calls before_training_epoch once more before it sees the stop request.)
    lrs = recorder.lrs[:epochs]
    # lr: 0.25 divided by 3 after every 5 epochs without improvement, down to the 1e-3 floor.
    distinct = sorted(set(lrs), reverse=True)
    assert distinct[0] == pytest.approx(0.25) and distinct[1] == pytest.approx(0.25 / 3)
    assert distinct[-1] == pytest.approx(1e-3)
    # Exactly `stop_patience` (5) epochs are trained at the floor without improvement.
    assert sum(lr == pytest.approx(1e-3) for lr in lrs) == 5
    # The weights at the end of the experience are those of epoch 2 (the best one).
    best = recorder.epoch_states[1]
    final = recorder.final_states[0]
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(final[k], recorder.epoch_states[-1][k]) for k in best)
    assert plateau.history[0]["best_epoch"] == 2


def test_a_task_whose_validation_loss_is_never_finite_keeps_its_starting_weights(
    small_stream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference loop starts every task with "best = the weights it starts from": a task
    # that blows up in its first epoch must not hand non-finite weights to the next task.
    plateau = PlateauEarlyStopping(_validation(small_stream), lr=0.25)
    monkeypatch.setattr(plateau, "validation_loss", lambda strategy: float("nan"))

    class StartRecorder(_Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.start_states: list[dict[str, torch.Tensor]] = []

        def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            super().before_training_epoch(strategy)
            if len(self.lrs) == 1:
                self.start_states.append(copy.deepcopy(strategy.model.state_dict()))

        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            with torch.no_grad():  # the blow-up: every weight becomes NaN
                for p in strategy.model.parameters():
                    p.fill_(float("nan"))

    recorder = StartRecorder()
    strategy = _strategy(small_stream, [plateau, recorder], epochs=100)
    strategy.train(make_benchmark(small_stream).train_stream[0])

    start, final = recorder.start_states[0], recorder.final_states[0]
    names = [name for name, _ in strategy.model.named_parameters()]
    assert all(torch.isnan(recorder.epoch_states[0][name]).all() for name in names)
    assert final.keys() == start.keys()
    assert all(torch.equal(final[k], start[k]) for k in start)
    assert plateau.history[0]["best_epoch"] == -1
    assert plateau.history[0]["best_valid_loss"] == float("inf")


def test_every_experience_starts_from_the_initial_lr(
    small_stream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plateau = PlateauEarlyStopping(_validation(small_stream), lr=0.25, patience=0)
    monkeypatch.setattr(plateau, "validation_loss", lambda strategy: 1.0)
    recorder = _Recorder()
    strategy = _strategy(small_stream, [plateau, recorder], epochs=3)
    train_stream = make_benchmark(small_stream).train_stream
    strategy.train(train_stream[0])
    strategy.optimizer.state[next(strategy.model.parameters())] = {"stale": torch.zeros(1)}
    strategy.train(train_stream[1])
    assert recorder.lrs[0] == recorder.lrs[3] == pytest.approx(0.25)
    assert recorder.lrs[2] < 0.25  # decayed inside the first experience
    assert not strategy.optimizer.state  # a fresh optimizer state per task


def test_validation_loss_uses_the_task_head_in_eval_mode(small_stream: Any) -> None:
    plateau = PlateauEarlyStopping(_validation(small_stream), lr=0.1)
    strategy = _strategy(small_stream, [plateau], epochs=1)
    strategy.train(make_benchmark(small_stream).train_stream[1])
    strategy.model.train()
    strategy.experience = make_benchmark(small_stream).train_stream[1]
    loss = plateau.validation_loss(strategy)
    x, y = small_stream.tasks[1].x_valid, small_stream.tasks[1].y_valid
    strategy.model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(strategy.model(x, torch.full((len(y),), 1)), y)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    strategy.model.train()
    plateau.validation_loss(strategy)
    assert strategy.model.training  # the train/eval flags are restored


@pytest.mark.parametrize("method", ["spg", "spg+replay"])
def test_the_schedule_plugin_runs_before_spg(small_stream: Any, method: str) -> None:
    plateau = PlateauEarlyStopping(_validation(small_stream), lr=0.25)
    model = make_backbone("paper", "split-digits", (1, 8, 8), 2)
    ctx = StrategyContext(
        model=model,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.25),
        train_mb_size=16,
        train_epochs=2,
        eval_mb_size=64,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        n_tasks=5,
        source="digits",
        first_plugins=[plateau],
    )
    strategy = build_strategy(method, ctx, {"mem_size": 10})
    kinds = [type(p) for p in strategy.plugins]
    assert kinds.index(PlateauEarlyStopping) < kinds.index(SPGPlugin)


def test_paper_protocol_end_to_end(tmp_path: Path) -> None:
    stream = build_stream("split-digits", seed=0, max_train_per_task=40, validation_fraction=0.1)
    spec = RunSpec(
        "split-digits",
        "spg",
        0,
        protocol_settings("paper", epochs=3),
        {},
        "cpu",
        progress=False,
    )
    result = run_one(spec, stream, tmp_path, log=lambda _: None)
    assert len(result["matrix"]) == 5
    assert len(result["epochs_per_task"]) == 5 and max(result["epochs_per_task"]) <= 3
    assert result["stream"]["valid_per_task"] == [4] * 5
    assert result["protocol"]["lr"] == 0.25
    # SPG's importance pass runs at the end of every task, inside its training time.
    passes, training = result["importance_seconds_per_task"], result["train_seconds_per_task"]
    assert len(passes) == len(training) == 5
    assert all(0 < t_pass < t_train for t_pass, t_train in zip(passes, training, strict=True))
    assert sum(passes) == pytest.approx(result["importance_seconds"])


def test_backbones() -> None:
    assert isinstance(make_backbone("quick", "split-fmnist", (1, 28, 28), 2), MultiHeadMLP)
    quick_cifar = make_backbone("quick", "c10", (3, 32, 32), 10)
    assert isinstance(quick_cifar, AlexNetLike)
    paper = make_backbone("paper", "c20", (3, 32, 32), 5)
    assert isinstance(paper, AlexNetLike)
    dropouts = [m.p for m in paper.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts[0] == PAPER_DROPOUT["c20"][0] and dropouts[-1] == PAPER_DROPOUT["c20"][1]
    assert isinstance(make_backbone("paper", "split-digits", (1, 8, 8), 2), MultiHeadMLP)
    out = paper.forward_single_task(torch.zeros(2, 3, 32, 32), 0)
    assert out.shape == (2, 5)


def test_tensor_minibatches_evaluate_exactly_like_avalanche_loaders() -> None:
    stream = build_stream("split-digits", seed=1)
    benchmark = make_benchmark(stream)
    tensors = TensorDataPlugin(
        {t: (k.x_train, k.y_train) for t, k in enumerate(stream.tasks)},
        {t: (k.x_test, k.y_test) for t, k in enumerate(stream.tasks)},
    )
    strategy = _strategy(stream, [tensors], epochs=1)
    strategy.train(benchmark.train_stream[0])
    strategy.eval(benchmark.test_stream)
    fast = strategy.evaluator.get_last_metrics()
    tensors.attach({}, {})  # detached: Avalanche's own loaders
    strategy.eval(benchmark.test_stream)
    slow = strategy.evaluator.get_last_metrics()
    keys = [k for k in fast if k.startswith("Top1_Acc_Exp")]
    assert len(keys) == 5
    assert all(fast[k] == slow[k] for k in keys)


def test_tensor_minibatches_cover_the_experience_once_per_epoch() -> None:
    stream = build_stream("split-digits", seed=0, max_train_per_task=50)
    seen: list[int] = []

    class Count(SupervisedPlugin):
        def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            seen.append(len(strategy.mb_y))
            assert bool((strategy.mb_task_id == 2).all())

    tensors = TensorDataPlugin({2: (stream.tasks[2].x_train, stream.tasks[2].y_train)}, {})
    strategy = _strategy(stream, [tensors, Count()], epochs=2)
    strategy.train(make_benchmark(stream).train_stream[2])
    assert sum(seen) == 2 * 50 and max(seen) == 16


def test_backbone_option_picks_the_network_and_auto_is_the_protocols_choice() -> None:
    from benchmarks.protocols import backbone_description, resolve_backbone

    for protocol in ("quick", "paper"):
        for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
            auto = make_backbone(protocol, "b", shape, 2)
            if protocol == "paper" and shape == (1, 28, 28):
                assert isinstance(auto, AlexNetLike)
            assert type(auto) is type(make_backbone(protocol, "b", shape, 2, "auto"))
    mlp = make_backbone("paper", "split-fmnist", (1, 28, 28), 2, "mlp")
    assert isinstance(mlp, MultiHeadMLP)
    assert [m.out_features for m in mlp.features if isinstance(m, torch.nn.Linear)] == [256, 256]
    assert backbone_description("mlp", "paper", (1, 28, 28)) == "MLP 784-256-256"
    assert isinstance(
        make_backbone("quick", "split-fmnist", (1, 28, 28), 2, "alexnet"), AlexNetLike
    )
    with pytest.raises(ValueError, match="8x8"):
        resolve_backbone("alexnet", "paper", (1, 8, 8))
    with pytest.raises(ValueError, match="'vgg'"):
        resolve_backbone("vgg", "paper", (1, 28, 28))


def test_resnet_backbone_is_avalanches_batchnorm_resnet_on_padded_images() -> None:
    from avalanche.models import MTSlimResNet18

    from benchmarks._resnet import SlimResNetBackbone

    net = make_backbone("quick", "split-fmnist", (1, 28, 28), 2, "resnet")
    assert isinstance(net, SlimResNetBackbone) and isinstance(net.net, MTSlimResNet18)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    x = torch.rand(4, 1, 28, 28)
    net.eval()
    out = net(x, torch.zeros(4, dtype=torch.long))
    assert out.shape == (4, 2)
    # The wrapper only pads and repeats channels: the same logits as the network itself.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    assert torch.equal(net.forward_single_task(x, 0), net.net(padded, 0))
    with pytest.raises(ValueError, match="up to 32x32"):
        SlimResNetBackbone((1, 64, 64), 2)
