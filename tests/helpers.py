"""Shared builders for the test-suite: digits benchmarks, tiny models, probe plugins, and an
independent reference implementation of SPG's importance pass.

The reference implementation below is written straight from section 1 of
``docs/algorithm.md`` and deliberately shares no code with ``avalanche_spg``: the tests
compare the plugin against it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from avalanche_spg.models import MultiHeadMLP

DIGITS_FEATURES = 64


# --------------------------------------------------------------------------------------- data
class TensorDigits(Dataset):
    """An in-memory classification dataset with the ``targets`` list ``nc_benchmark`` needs."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x = x
        self.y = y
        self.targets = y.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], int(self.y[index])


def digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 real 8x8 digits as ``(x in [0, 1], float32, (N, 64); y, int64)``,
    in a fixed shuffled order (so any prefix holds every class). Fresh tensors on every call
    (a few tens of milliseconds); tests share one copy through the ``digits`` fixture."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    return x[perm].contiguous(), y[perm].contiguous()


def make_digits_benchmark(
    n_experiences: int = 5,
    *,
    task_labels: bool = True,
    n_train: int = 1400,
    n_test: int = 397,
    seed: int = 0,
    fixed_class_order: Sequence[int] | None = None,
    classes: Sequence[int] | None = None,
    data: tuple[Tensor, Tensor] | None = None,
) -> Any:
    """A class-split benchmark on digits (task-incremental by default: 2 classes per task,
    labels from 0 in every task). ``n_train``/``n_test`` take prefixes of the shuffled data
    (after keeping only ``classes``, if given). ``data``: the digits (``digits_tensors()``) if
    already loaded; the benchmark holds copies, never views of them."""
    x, y = digits_tensors() if data is None else data
    if classes is not None:
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    if n_train + n_test > len(y):
        raise ValueError(f"only {len(y)} digits samples available")
    train = TensorDigits(x[:n_train].clone(), y[:n_train].clone())
    test = TensorDigits(
        x[n_train : n_train + n_test].clone(), y[n_train : n_train + n_test].clone()
    )
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=task_labels,
        class_ids_from_zero_in_each_exp=task_labels,
        seed=seed,
        fixed_class_order=None if fixed_class_order is None else list(fixed_class_order),
    )


# ------------------------------------------------------------------------------------- models
def make_mlp(hidden: Sequence[int] = (16,), dropout: float = 0.0, seed: int = 0) -> MultiHeadMLP:
    """A tiny multi-head MLP for digits, deterministically initialised."""
    torch.manual_seed(seed)
    return MultiHeadMLP(DIGITS_FEATURES, hidden_sizes=tuple(hidden), dropout=dropout)


class PlainMLP(nn.Module):
    """A single-head model without task heads (a plain ``nn.Module``)."""

    def __init__(self, hidden: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(DIGITS_FEATURES, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))


class CastingMultiHeadMLP(MultiTaskModule):
    """A multi-head MLP whose feature extractor runs in its own dtype (e.g. bfloat16).

    Heads are created lazily by Avalanche in float32, so features are cast to float32 before
    the head (Avalanche's multi-task forward assembles its output in float32 anyway)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(DIGITS_FEATURES, hidden), nn.ReLU())
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        x = x.to(self.features[0].weight.dtype)
        return self.classifier(self.features(x).float(), task_label)


def feature_param_names(model: nn.Module, head_prefix: str = "classifier.") -> set[str]:
    """Names of the trainable parameters outside the default head module."""
    return {
        n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head_prefix)
    }


# --------------------------------------------------------------------------------- strategies
def quiet_evaluator() -> EvaluationPlugin:
    """An evaluator with no metrics and no loggers (no console output)."""
    return EvaluationPlugin(loggers=[])


def make_naive(
    model: nn.Module,
    plugins: Iterable[SupervisedPlugin] = (),
    *,
    lr: float = 0.1,
    optimizer: torch.optim.Optimizer | None = None,
    train_mb_size: int = 32,
    train_epochs: int = 1,
    evaluator: Any = None,
    criterion: Any = None,
    strategy_cls: type = Naive,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> Any:
    """A small strategy (``Naive`` by default) with plain SGD unless ``optimizer`` is given."""
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return strategy_cls(
        model=model,
        optimizer=optimizer,
        criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
        train_mb_size=train_mb_size,
        train_epochs=train_epochs,
        eval_mb_size=256,
        plugins=list(plugins),
        evaluator=evaluator if evaluator is not None else quiet_evaluator(),
        device=device,
        **kwargs,
    )


# ----------------------------------------------------------------------------- probe plugins
class GradRecorder(SupervisedPlugin):
    """Records a clone of every parameter's gradient (by name) at each ``before_update``.

    Placed before ``SPGPlugin`` in the plugin list it sees the raw gradients; placed after it,
    the masked ones. ``records[e]`` is the list of per-iteration snapshots of experience ``e``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[list[dict[str, Tensor | None]]] = []

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.records.append([])

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.records[-1].append(
            {
                n: (None if p.grad is None else p.grad.detach().clone())
                for n, p in strategy.model.named_parameters()
            }
        )


class CallbackProbe(SupervisedPlugin):
    """Runs user functions ``fn(strategy)`` at named callbacks (for before/after SPG checks)."""

    def __init__(self, **callbacks: Callable[[Any], None]) -> None:
        super().__init__()
        self._callbacks = callbacks

    def _run(self, name: str, strategy: Any) -> None:
        fn = self._callbacks.get(name)
        if fn is not None:
            fn(strategy)

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._run("before_training_exp", strategy)

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._run("before_update", strategy)

    def after_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._run("after_update", strategy)

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._run("after_training_iteration", strategy)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._run("after_training_exp", strategy)


# ------------------------------------------------------- independent reference implementation
def _usable(grad: Tensor | None) -> bool:
    """Usable (``docs/algorithm.md``, section 4): not None, at least 2 elements, all finite,
    not all zero, std finite and > 0."""
    if grad is None or grad.numel() < 2:
        return False
    g = grad.double()
    if not torch.isfinite(g).all() or not (g != 0).any():
        return False
    std = g.std()
    return bool(torch.isfinite(std)) and float(std) > 0


def reference_gamma(
    model: nn.Module,
    dataset: Dataset,
    previous_tasks: Sequence[int],
    current_task: int | Sequence[int],
    batch_size: int,
    feature_names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """``gamma`` of one experience, computed on a deep copy of ``model`` exactly as section 1 of
    ``docs/algorithm.md`` says: for every head ``j`` in ``prev + [k]``, zero the grads, sum the
    gradients of ``CE(out, y)`` (``j == k``) or ``out.sum()`` (``j != k``) over the experience's
    minibatches in fixed order, then per feature tensor ``|tanh((G - mean) / std)|``, max over
    heads.

    The model is called as Avalanche's training calls it: ``model(x, task_labels)`` with one
    task label per sample (positionally) for a ``MultiTaskModule``, ``model(x)`` otherwise; a
    minibatch's task labels are its last element (``[x, y, ..., t]``; ``[x, y]`` means the
    current task). The current head sees every sample with its own label (``current_task`` may
    name several tasks, for minibatches that mix them); old head ``j`` sees a label tensor
    filled with ``j``. Train mode, except that a model the strategy trains partly in eval mode
    keeps its flags; only a model entirely in eval mode is switched to train mode.
    """
    model = copy.deepcopy(model)
    if not any(m.training for m in model.modules()):
        model.train()
    multitask = isinstance(model, MultiTaskModule)
    current = [current_task] if isinstance(current_task, int) else list(current_task)
    names = set(feature_param_names(model) if feature_names is None else feature_names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    gamma = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    heads: list[int | None] = [j for j in previous_tasks if j not in current] if multitask else []
    for j in [*heads, None]:  # None: the current head(s), each sample through its own
        model.zero_grad()
        for batch in loader:
            x, y = batch[0], batch[1]
            t = batch[-1] if len(batch) >= 3 else torch.full((len(y),), current[0])
            labels = t if j is None else torch.full_like(t, j)
            out = model(x, labels) if multitask else model(x)
            loss = F.cross_entropy(out, y) if j is None else out.sum()
            loss.backward()
        for n, p in params.items():
            if not _usable(p.grad):
                continue
            g = p.grad.detach().float()
            z = (g - g.mean()) / g.std()
            gamma[n] = torch.maximum(gamma[n], torch.tanh(z).abs())
    model.zero_grad()
    return gamma


def reference_accumulate(accumulated: dict[str, Tensor], gamma: dict[str, Tensor]) -> None:
    """``A = max(A, gamma)`` elementwise, in place."""
    for n, g in gamma.items():
        accumulated[n] = g.clone() if n not in accumulated else torch.maximum(accumulated[n], g)


def snapshot_params(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def set_seed(seed: int) -> None:
    """Seed torch, numpy and random."""
    import random

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def checkpoint_protocol(ckpt: str | None, stop: int) -> dict[str, Any]:
    """One run of the 4-experience resume protocol (tests/test_checkpoint.py): build everything
    from fixed seeds, resume from ``ckpt`` if that file exists, train experiences
    ``[start, stop)`` with an evaluation and a checkpoint after each, return the final state.
    ``ckpt=None``: an uninterrupted run that never checkpoints."""
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics

    from avalanche_spg import SPGPlugin
    from avalanche_spg.checkpoint import find_plugin, maybe_load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    set_seed(0)
    benchmark = make_digits_benchmark(4, classes=range(8), n_train=480, n_test=160)
    model = make_mlp(hidden=(16,), dropout=0.2)  # dropout: the RNG state matters
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[],
    )
    strategy = make_naive(
        model,
        [SPGPlugin(warn_optimizer=False)],
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
        train_epochs=2,
        evaluator=evaluator,
    )
    start = 0
    if ckpt is not None:
        strategy, start = maybe_load_checkpoint(strategy, ckpt)
    results: dict[str, Any] = {}
    for experience in benchmark.train_stream[start:stop]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        if ckpt is not None:
            save_checkpoint(strategy, ckpt)
    plugin = find_plugin(strategy, SPGPlugin)
    return {
        "start": start,
        "params": snapshot_params(strategy.model),
        "importance": plugin.importance,
        "head_scale": plugin.head_scale,
        "seen_tasks": plugin.seen_tasks,
        "results": results,
        "history": strategy.evaluator.get_all_metrics(),
    }
