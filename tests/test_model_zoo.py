"""SPG's importance on the models people bring to Avalanche (paper Section 3.1), against the
independent reference of ``tests/helpers.py``.

Avalanche calls a multi-task model as ``model(x, task_labels)`` (positionally, one label per
sample) and reads a minibatch's task labels from its last element; the importance pass must do
the same, whatever the model calls its argument (``PackNetModel``: ``task_id``) and however
many elements a minibatch has. In train mode batch normalisation normalises with the
statistics of the minibatch it sees, so the pass must see the reference's minibatches on such
models. And the pass must leave the model exactly as it found it: parameters, buffers, plain
tensor attributes (Avalanche's ``BatchRenorm2D``), train/eval flags.

Everything is tiny (10 samples per task, 3 tasks, minibatches of 4) so the file runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.models import (
    PNN,
    MTSimpleCNN,
    MTSimpleMLP,
    MTSlimResNet18,
    MultiHeadClassifier,
    MultiTaskModule,
    SimpleMLP,
    as_multitask,
)
from avalanche.models.batch_renorm import BatchRenorm2D
from avalanche.models.packnet import PackNetModel
from helpers import (
    CallbackProbe,
    TensorDigits,
    make_naive,
    reference_accumulate,
    reference_gamma,
)
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from avalanche_spg import SPGPlugin
from avalanche_spg.importance_pass import compute_gamma

Digits = tuple[Tensor, Tensor]  # the ``digits`` fixture of conftest.py

MB = 4  # training minibatch: experiences of 10 samples give minibatches of 4, 4 and 2
PER_TASK = 10
N_TASKS = 3
TOL = 1e-5


# --------------------------------------------------------------------------------------- data
def _digits(digits: Digits, per_class: int, image: bool) -> tuple[Tensor, Tensor]:
    """``per_class`` digits of each class 0-5 (flat 64 features, or 3x32x32 images), copied
    from the session's ``digits``."""
    x, y = digits
    keep = torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in range(2 * N_TASKS)])
    keep = keep.sort().values
    x, y = x[keep], y[keep]
    if image:
        x = F.interpolate(x.view(-1, 1, 8, 8), size=(32, 32), mode="bilinear")
        x = x.repeat(1, 3, 1, 1).contiguous()
    return x, y


def _benchmark(digits: Digits, image: bool) -> Any:
    """3 task-incremental experiences of 2 classes and 10 training samples each."""
    x, y = _digits(digits, PER_TASK // 2 + 2, image)
    train_rows = torch.cat(
        [(y == c).nonzero().squeeze(1)[: PER_TASK // 2] for c in range(2 * N_TASKS)]
    ).sort()
    test_rows = torch.cat([(y == c).nonzero().squeeze(1)[PER_TASK // 2 :] for c in range(6)])
    return nc_benchmark(
        TensorDigits(x[train_rows.values], y[train_rows.values]),
        TensorDigits(x[test_rows], y[test_rows]),
        n_experiences=N_TASKS,
        task_labels=True,
        class_ids_from_zero_in_each_exp=True,
        fixed_class_order=list(range(2 * N_TASKS)),
    )


# ------------------------------------------------------------------------------------- models
def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class TaskIdModule(MultiTaskModule):
    """A user's multi-task model: its own ``forward`` names the task argument ``task_id``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU())
        self.classifier = MultiHeadClassifier(12, initial_out_features=2)

    def forward(self, x: Tensor, task_id: Tensor) -> Tensor:  # type: ignore[override]
        return self.classifier(self.features(x), task_id)


class _Flat(nn.Module):
    """Flattens 8x8 digits to 64 features (PackNet wraps every child module)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    # name: (builder, whether it takes images)
    "MTSimpleMLP": (lambda: _no_dropout(MTSimpleMLP(input_size=64, hidden_size=24)), False),
    "MTSimpleCNN": (lambda: _no_dropout(MTSimpleCNN()), True),
    "MTSlimResNet18": (lambda: MTSlimResNet18(2, nf=4), True),
    "resnet18": (
        lambda: as_multitask(
            __import__("torchvision").models.resnet18(weights=None, num_classes=2), "fc"
        ),
        True,
    ),
    "task_id_forward": (TaskIdModule, False),
    "PackNetModel": (
        lambda: PackNetModel(_no_dropout(SimpleMLP(2, 64, hidden_size=16, drop_rate=0.0))),
        False,
    ),
    # One column per task: the features the classifier sees depend on the task label.
    "PNN": (lambda: PNN(in_features=64, hidden_features_per_column=8), False),
}


def _features(model: nn.Module) -> set[str]:
    """The default SPG feature parameters: everything outside a ``MultiHeadClassifier``."""
    heads = [n for n, m in model.named_modules() if isinstance(m, MultiHeadClassifier)]
    return {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not any(n.startswith(h + ".") for h in heads)
    }


def _assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].shape == value.shape, name
        diff = float((actual[name].float().cpu() - value).abs().max())
        assert diff <= TOL, f"{name}: max abs difference {diff:.3g}"


def _assert_not_trivial(importance: dict[str, Tensor], unreached: str | None = None) -> None:
    """The comparison is not between zeros: every tensor got a real importance (except those
    whose names contain ``unreached``: parameters the forward never uses)."""
    for name, value in importance.items():
        if unreached is None or unreached not in name:
            assert float(value.max()) > 0.3, name


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(MODELS))
def test_importance_equals_the_reference_after_three_experiences(name: str, digits: Digits) -> None:
    build, image = MODELS[name]
    torch.manual_seed(0)
    model = build()
    benchmark = _benchmark(digits, image)
    plugin = SPGPlugin()  # default settings: the fast pass
    strategy = make_naive(model, [plugin], lr=0.05, train_mb_size=MB)
    expected: dict[str, Tensor] = {}
    seen: list[int] = []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        (task,) = experience.task_labels
        dataset = experience.dataset.train()
        assert len(dataset) % MB  # the smaller last minibatch is exercised
        gamma = reference_gamma(model, dataset, seen, task, MB, _features(model))
        reference_accumulate(expected, gamma)
        seen.append(task)
    # A one-layer PNN has lateral adapters that its forward does not use.
    _assert_not_trivial(expected, "adapter" if name == "PNN" else None)
    _assert_close(plugin.importance, expected)


class _Extra(Dataset):
    """Items ``[x, y, sample_id, task]`` (the sample id in a valid head range, so that reading
    it as the task label would silently pick wrong heads)."""

    def __init__(self, dataset: Any) -> None:
        self.items = [dataset[i][:3] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        x, y, t = self.items[index]
        return x, y, index % N_TASKS, t


def _trained_mlp(digits: Digits) -> tuple[nn.Module, Any]:
    torch.manual_seed(1)
    model = _no_dropout(MTSimpleMLP(input_size=64, hidden_size=24))
    benchmark = _benchmark(digits, image=False)
    strategy = make_naive(model, [], lr=0.1, train_mb_size=MB)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    return model, benchmark


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_task_labels_are_the_last_element_of_a_minibatch(method: str, digits: Digits) -> None:
    model, benchmark = _trained_mlp(digits)
    dataset = _Extra(benchmark.train_stream[2].dataset.train())
    features = {n: p for n, p in model.named_parameters() if n in _features(model)}
    expected = reference_gamma(model, dataset, [0, 1], 2, MB, features)
    _assert_not_trivial(expected)
    gamma = compute_gamma(
        model, dataset, features, [2], [0, 1], device="cpu", reference_batch_size=MB, method=method
    )
    _assert_close(gamma, expected)


class _BatchNormMLP(MultiTaskModule):
    """Batch norm in the features, Avalanche's default forward (one call per task group)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = MultiHeadClassifier(16, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.features(x), task_label)


class _BatchNormWholeBatch(_BatchNormMLP):
    """Batch norm over the whole minibatch, the task labels used by the classifier only (as in
    ``MTSlimResNet18``)."""

    def forward(self, x: Tensor, task_labels: Tensor) -> Tensor:  # type: ignore[override]
        return self.classifier(self.features(x), task_labels)


class _Interleaved(Dataset):
    """Tasks 1 and 2 interleaved, so every minibatch mixes two task labels."""

    def __init__(self, benchmark: Any) -> None:
        a = benchmark.train_stream[1].dataset.train()
        b = benchmark.train_stream[2].dataset.train()
        self.items = [item[:3] for pair in zip(a, b) for item in pair]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


@pytest.mark.parametrize("model_cls", [_BatchNormMLP, _BatchNormWholeBatch])
@pytest.mark.parametrize("pass_batch_size", [None, 7])
def test_batch_norm_minibatches_mixing_tasks(
    model_cls: type, pass_batch_size: int | None, digits: Digits
) -> None:
    """The fast pass sees the reference's minibatches and groups them by task exactly where the
    model does (a requested pass batch size cannot change that)."""
    torch.manual_seed(2)
    model = model_cls()
    benchmark = _benchmark(digits, image=False)
    strategy = make_naive(model, [], lr=0.1, train_mb_size=MB)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    dataset = _Interleaved(benchmark)
    features = {n: p for n, p in model.named_parameters() if n in _features(model)}
    expected = reference_gamma(model, dataset, [0], [1, 2], MB, features)
    _assert_not_trivial(expected)
    for method in ("fast", "reference"):
        gamma = compute_gamma(
            model,
            dataset,
            features,
            [1, 2],
            [0],
            device="cpu",
            reference_batch_size=MB,
            method=method,  # type: ignore[arg-type]
            pass_batch_size=pass_batch_size,
        )
        _assert_close(gamma, expected)


# ------------------------------------------------------------------- nothing of the model moves
class _Renormed(MultiTaskModule):
    """Batch norm, Avalanche's batch renormalisation (statistics in plain tensor attributes and
    floats), and a second renormalisation that the strategy keeps in eval mode (as AR1 does with
    its lower layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = BatchRenorm2D(3, running_mean=torch.zeros(3), running_var=torch.ones(3))
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.renorm = BatchRenorm2D(4, running_mean=torch.zeros(4), running_var=torch.ones(4))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = MultiHeadClassifier(16, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        h = self.renorm(self.bn(self.conv(self.frozen(x)))).relu()
        return self.classifier(self.pool(h).flatten(1), task_label)


def _full_state(model: nn.Module) -> dict[str, Any]:
    """Flags, parameters, buffers and every plain attribute of every module."""
    state: dict[str, Any] = {}
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules") or "hooks" in key:
                continue
            if isinstance(value, Tensor):
                value = value.detach().clone()
            elif not isinstance(value, (bool, int, float, str, type(None))):
                continue
            state[f"{prefix}:{key}"] = value
    for key, value in model.state_dict(keep_vars=True).items():
        state[key] = value.detach().clone()
    return state


def _assert_same_state(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert set(after) == set(before)
    for key, value in before.items():
        if isinstance(value, Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_the_pass_changes_nothing_of_the_model(method: str, digits: Digits) -> None:
    """Nothing changes (BatchRenorm2D statistics included), and a module the strategy keeps in
    eval mode stays in eval mode during the pass too."""
    torch.manual_seed(3)
    model = _Renormed()
    benchmark = _benchmark(digits, image=True)
    states: list[tuple[dict[str, Any], dict[str, Any]]] = []
    frozen_modes: list[bool] = []
    renorm_modes: list[bool] = []
    model.frozen.register_forward_pre_hook(lambda m, a: frozen_modes.append(m.training))
    model.renorm.register_forward_pre_hook(lambda m, a: renorm_modes.append(m.training))

    def freeze(strategy: Any) -> None:
        strategy.model.frozen.eval()

    def before(strategy: Any) -> None:
        states.append((_full_state(strategy.model), {}))
        frozen_modes.clear()
        renorm_modes.clear()

    def after(strategy: Any) -> None:
        states[-1][1].update(_full_state(strategy.model))
        assert frozen_modes and not any(frozen_modes)  # as the strategy set it
        assert renorm_modes and all(renorm_modes)

    strategy = make_naive(
        model,
        [
            CallbackProbe(before_training_exp=freeze, after_training_exp=before),
            SPGPlugin(importance_method=method),
            CallbackProbe(after_training_exp=after),
        ],
        lr=0.05,
        train_mb_size=MB,
    )
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    assert len(states) == 2
    for before_pass, after_pass in states:
        _assert_same_state(after_pass, before_pass)
    # The pass had something to restore: training moves the statistics it is given.
    assert not torch.equal(model.renorm.running_avg_mean, torch.zeros(1, 4, 1, 1))


def test_a_direct_call_restores_batch_norm_statistics_and_flags(digits: Digits) -> None:
    """``compute_gamma`` itself leaves the model as it found it (not only the plugin)."""
    torch.manual_seed(4)
    model = _BatchNormMLP()
    benchmark = _benchmark(digits, image=False)
    strategy = make_naive(model, [], lr=0.1, train_mb_size=MB)
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    model.eval()
    before = _full_state(model)
    flags = {n: m.training for n, m in model.named_modules()}
    features = {n: p for n, p in model.named_parameters() if n in _features(model)}
    for method in ("fast", "reference"):
        compute_gamma(
            model,
            benchmark.train_stream[1].dataset.train(),
            features,
            [1],
            [0],
            device="cpu",
            reference_batch_size=MB,
            method=method,  # type: ignore[arg-type]
        )
        _assert_same_state(_full_state(model), before)
        assert {n: m.training for n, m in model.named_modules()} == flags
        assert all(p.grad is None for p in model.parameters())


def test_a_model_entirely_in_eval_mode_is_run_in_train_mode(digits: Digits) -> None:
    """The paper's train mode (batch statistics, dropout): only a model found entirely in eval
    mode is switched (a strategy that keeps some modules in eval mode keeps them so)."""
    torch.manual_seed(5)
    model = _BatchNormMLP()
    benchmark = _benchmark(digits, image=False)
    strategy = make_naive(model, [], lr=0.1, train_mb_size=MB)
    strategy.train(benchmark.train_stream[0])
    dataset = benchmark.train_stream[0].dataset.train()
    features = {n: p for n, p in model.named_parameters() if n in _features(model)}
    expected = reference_gamma(model, dataset, [], 0, MB, features)  # model in train mode
    modes: list[bool] = []
    model.features[1].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    model.eval()
    gamma = compute_gamma(model, dataset, features, [0], [], device="cpu", reference_batch_size=MB)
    assert modes and all(modes)
    assert not any(m.training for m in model.modules())
    _assert_close(gamma, expected)
