"""The importance pass: per-head summed gradients over an experience, turned into ``gamma``.

Paper, Section 3.1: after training experience ``k``, for every head ``j`` seen so far (the
current one last), sum over all minibatches of ``k``'s training data the gradient of

* the ordinary cross-entropy (batch mean) of head ``k`` when ``j`` is the current head, or
* the sum of all logits of head ``j`` when ``j`` is an older head,

standardise each feature tensor's summed gradient, squash with ``|tanh|`` and take the max over
heads (see ``docs/algorithm.md`` for the algorithm and its guards).

How the model is called
    Exactly as the training loop calls it (the *calling convention*, ``forward``): Avalanche
    calls a multi-task model ``model(x, task_labels)``, positionally, with one task label per
    sample, and takes a minibatch's task labels from its last element (``[x, y, t]``,
    ``[x, y, sample_id, t]``; ``[x, y]`` means the current task). The current head sees every
    sample with its own label, so a model that groups a minibatch by task does so as in
    training; old head ``j`` sees a label tensor filled with ``j``.

The model's state
    The pass runs on the model as it is when training ends and leaves it exactly so:
    parameters, buffers (batch-norm statistics), plain tensor and number attributes of modules
    (Avalanche's ``BatchRenorm2D`` keeps its statistics there) and every module's train/eval
    flag are restored afterwards, and every forward of the pass sees them as they were at the
    start (:class:`ModelState`). The pass runs in train mode (dropout active, as in the paper)
    with the flags the strategy trained with: a strategy that keeps some modules in eval mode
    (AR1 freezes its lower layers and their batch renormalisation so) gets the importance of
    the function it trained. Only a model found *entirely* in eval mode is switched to train
    mode for the pass.

Two implementations give the same result:

``"reference"``
    The straightforward loop: for every head, one forward and one ``backward()`` per minibatch
    at the reference minibatch size. After task ``k`` that is ``k + 1`` full forward/backward
    passes over the task's data.
``"fast"``
    One forward of the feature extractor per minibatch, shared by all heads. The classifier's
    input ``h`` is captured with a forward pre-hook on the model's multi-head classifier; each
    head's cotangent ``dL_j/dh`` is computed on a detached copy of ``h`` (only the small head
    runs again), and one backward per head from ``h`` reaches the feature parameters only. So
    the pass costs ``1`` forward plus ``k + 1`` feature-extractor backward passes instead of
    ``k + 1`` of each. Minibatches may be larger than the reference's: its *sum of per-minibatch
    means* is reproduced exactly at any batch size by weighting every sample by ``1 / size`` of
    the reference minibatch it would have been in (:func:`reference_sample_weights`).
    Optionally (``vectorize_heads=True``) the per-head backward passes run as one batched call
    (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the stacked
    cotangents), falling back to the loop if an operation has no batching rule.

    When a module uses the statistics of its minibatch in train mode (batch normalisation,
    batch renormalisation, any module that keeps statistics in plain tensor attributes), the
    importance depends on which samples share a minibatch. The fast pass then runs at the
    reference minibatch size whatever ``pass_batch_size`` says, and a minibatch that mixes
    task labels is not split: its current-head loss comes from one call with the per-sample
    labels (the model groups it as in training) and the old heads share one call with the
    whole minibatch, as in the reference.

    The summed gradients of all heads are held at once (``k + 1`` copies of the feature
    parameters after task ``k``). When they would exceed ``sum_memory_budget`` bytes, the heads
    are processed in groups that fit, one more forward per minibatch and group; each head's
    sum is computed by the same operations, so the result is the same bit for bit (without
    dropout: with it, each group's forward draws its own dropout masks).

With no dropout the two methods agree up to float rounding, and bit for bit (on CPU) when the
fast pass uses the reference batch size and the loop of per-head backward passes. Rounding
differences come from summing the gradients in another order; standardisation amplifies them
where a gradient sum cancels almost entirely (an untrained network's first layer fed zero-mean
noise, say), since such a sum is mostly rounding error. With dropout the two methods differ
in which random masks each head sees (here all heads share one).

Safety nets of the fast path: if there is no classifier to tap, if a feature parameter lives
inside it, or if the model's output is not the classifier's output on the captured features
(possibly padded with zero columns, as Avalanche's multi-task forward pads heads to a common
width; a model that post-processes its logits is not), the fast pass runs one shared-batch
forward per head instead (still feature-only gradients). That is also what it does with a
single head (the first task), where there is no forward to share. Sharing the features needs a
feature extractor that does not depend on the task label (a progressive network's column per
task does): before the first minibatch the fast pass checks that every head's call gives the
classifier the same input on a few samples (same random numbers for each call), and falls back
otherwise.

Summed gradients are accumulated in float32 (float64 for a float64 model), whatever the model's
dtype; ``gamma`` is float32. The per-sample weighted losses are summed in float64, except on a
device without float64 (Apple's MPS: float32 there, :func:`loss_dtype`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset

from avalanche_spg.heads import missing_task_heads
from avalanche_spg.importance import has_float64, standardized_importance

__all__ = [
    "ImportanceMethod",
    "GradReducer",
    "ModelForward",
    "ModelState",
    "compute_gamma",
    "avalanche_convention",
    "default_pass_batch_size",
    "reference_sample_weights",
    "loss_dtype",
    "find_multihead_classifier",
    "preserve_train_flags",
    "preserved_model_state",
    "enter_pass_mode",
    "split_minibatch",
    "uses_batch_statistics",
    "checked_positions",
    "check_pass_parameters",
]

ImportanceMethod = Literal["fast", "reference"]
#: Called on each head's summed gradients before standardisation, in place (the distributed
#: plugin sums them across ranks here).
GradReducer = Callable[[list[Tensor]], None]
#: The calling convention: ``forward(model, x, task_labels)`` with one task label per sample,
#: as the training loop calls the model (Avalanche: ``avalanche_forward``).
ModelForward = Callable[[nn.Module, Tensor, Tensor], Tensor]

#: Default number of samples per minibatch of the fast pass, per device type. On a CPU, large
#: enough to amortise the per-minibatch overhead, small enough that a convolutional network's
#: activations stay in the caches; on a GPU larger batches amortise kernel launches and Python
#: overhead. The pass's cost is reported in ``benchmarks/results/perf.md``.
_TARGET_PASS_BATCH = {"cpu": 128, "cuda": 512}
#: With ``vectorize_heads``, at most this many cotangent rows (heads x samples) per batched
#: backward call, which bounds the memory of the batched activation gradients.
_MAX_BATCHED_ROWS = 4096
#: Samples on which the fast pass checks that all heads see the same features.
_PROBE_SAMPLES = 8
#: Default bound on the bytes of the fast pass's per-head summed gradients held at once.
DEFAULT_SUM_MEMORY_BUDGET = 2 * 1024**3


# ----------------------------------------------------------------------------- model state
@contextmanager
def preserve_train_flags(model: nn.Module, train: bool = True) -> Iterator[None]:
    """Put ``model`` in train (or eval) mode and restore every module's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


_Scalar = (bool, int, float, complex, str, type(None))


class ModelState:
    """A snapshot of everything of a model that a forward pass may change, and its restoration.

    Covered: every module's train/eval flag, its buffers (values and the tensor objects
    themselves), and its plain attributes that are tensors or numbers (batch renormalisation
    keeps running statistics and its ``r_max``/``d_max`` bounds there). Parameters are not
    copied (a forward/backward pass does not write them); ``.grad`` is the caller's business.
    Attributes and buffers a forward adds are removed on :meth:`restore`.
    """

    def __init__(self, model: nn.Module) -> None:
        self._flags = [(module, module.training) for module in model.modules()]
        self._buffers: list[tuple[nn.Module, dict[str, Tensor | None], list[Tensor]]] = []
        self._attributes: list[tuple[nn.Module, dict[str, Any], dict[str, Tensor]]] = []
        #: Modules with plain tensor attributes: state outside ``torch.nn``'s own conventions,
        #: which a forward may both read and write (reset before every forward of the pass).
        self.volatile: list[int] = []
        with torch.no_grad():
            for module in model.modules():
                buffers = dict(module._buffers)
                copies = [b.detach().clone() for b in buffers.values() if b is not None]
                self._buffers.append((module, buffers, copies))
                plain = {k: v for k, v in vars(module).items() if _is_plain(k, v)}
                tensors = {k: v.detach().clone() for k, v in plain.items() if isinstance(v, Tensor)}
                if tensors:
                    self.volatile.append(len(self._attributes))
                self._attributes.append((module, plain, tensors))

    def is_volatile(self, module: nn.Module) -> bool:
        """Whether ``module`` keeps state in plain tensor attributes."""
        return any(self._attributes[i][0] is module for i in self.volatile)

    def reset_volatile(self) -> None:
        """Restore the buffers and plain attributes of the :attr:`volatile` modules only."""
        with torch.no_grad():
            for index in self.volatile:
                self._restore_module(index)

    def restore(self) -> None:
        """Put back every flag, buffer and plain attribute as it was at the snapshot."""
        with torch.no_grad():
            for index in range(len(self._attributes)):
                self._restore_module(index)
        for module, flag in self._flags:
            module.training = flag

    def _restore_module(self, index: int) -> None:
        module, buffers, copies = self._buffers[index]
        for name in [n for n in module._buffers if n not in buffers]:
            del module._buffers[name]
        values = iter(copies)
        for name, buffer in buffers.items():
            module._buffers[name] = buffer
            if buffer is not None:
                _copy_back(buffer, next(values))
        module, plain, tensors = self._attributes[index]
        attributes = vars(module)
        added = [k for k, v in attributes.items() if k not in plain and _is_plain(k, v)]
        for key in added:
            del attributes[key]
        for key, value in plain.items():
            attributes[key] = value
            if key in tensors:
                _copy_back(value, tensors[key])


def _is_plain(key: str, value: Any) -> bool:
    """A plain attribute the snapshot covers: a tensor that is not a parameter, or a number
    (the train/eval flag is handled on its own)."""
    if key == "training":
        return False
    if isinstance(value, Tensor):
        return not isinstance(value, nn.Parameter)
    return isinstance(value, _Scalar)


def _copy_back(tensor: Tensor, value: Tensor) -> None:
    if tensor.shape == value.shape and tensor.dtype == value.dtype:
        if tensor.device == value.device:
            tensor.copy_(value)
            return
    tensor.data = value.clone()


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[ModelState]:
    """Snapshot ``model`` (:class:`ModelState`) and restore it on exit, whatever happens."""
    state = ModelState(model)
    try:
        yield state
    finally:
        state.restore()


def enter_pass_mode(model: nn.Module) -> None:
    """Train mode for the pass: the flags the strategy trained with, or, for a model found
    entirely in eval mode, train mode everywhere (see the module docstring)."""
    if not any(module.training for module in model.modules()):
        model.train()


def uses_batch_statistics(model: nn.Module, state: ModelState | None = None) -> bool:
    """Whether a module in train mode normalises with the statistics of its minibatch.

    Batch norm (``torch.nn`` ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm) in train mode,
    and, conservatively, any module in train mode that keeps tensors in plain attributes (as
    Avalanche's ``BatchRenorm2D`` does): its output may depend on the other samples of the
    minibatch.
    """
    state = state if state is not None else ModelState(model)
    return any(
        module.training and (isinstance(module, _BatchNorm) or state.is_volatile(module))
        for module in model.modules()
    )


# ------------------------------------------------------------------------- conventions, data
def avalanche_convention(model: nn.Module) -> tuple[ModelForward, bool]:
    """Avalanche's calling convention and whether ``model`` takes task labels at all.

    ``avalanche.models.utils.avalanche_forward``: ``model(x, task_labels)`` for a
    ``MultiTaskModule`` (or a ``DistributedDataParallel`` around one), ``model(x)`` otherwise.
    """
    from avalanche.models.utils import avalanche_forward, is_multi_task_module

    return avalanche_forward, bool(is_multi_task_module(model))


def find_multihead_classifier(model: nn.Module) -> nn.Module | None:
    """The single Avalanche ``MultiHeadClassifier`` inside ``model``, or ``None``."""
    from avalanche.models import MultiHeadClassifier

    found = [m for m in model.modules() if isinstance(m, MultiHeadClassifier)]
    return found[0] if len(found) == 1 else None


def reference_sample_weights(
    positions: Sequence[int], batch_size: int, total: int, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per-sample weights ``1 / |reference minibatch|`` for the samples at ``positions``.

    The reference pass sums minibatch *means* over consecutive minibatches of ``batch_size`` of a
    dataset of ``total`` samples (the last minibatch may be smaller). The sample at position
    ``p`` belongs to minibatch ``p // batch_size``; its weight in that mean is returned, so that
    a weighted sum over any batching (or any shard of positions) reproduces the reference sum.
    Weights are ``dtype`` (:func:`loss_dtype` of the device the pass runs on).
    """
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    batch_start = (pos // batch_size) * batch_size
    sizes = torch.clamp(total - batch_start, max=batch_size)
    return 1.0 / sizes.to(dtype)


def loss_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of the pass's weighted loss sums on ``device``: float64, or float32 on a
    device without float64 (Apple's MPS), where a float64 tensor cannot exist."""
    return torch.float64 if has_float64(torch.device(device)) else torch.float32


def default_pass_batch_size(reference_batch_size: int, device: torch.device | str) -> int:
    """The fast pass's default minibatch size: a multiple of the reference size near a
    per-device target (128 samples on CPU, 512 on a GPU)."""
    target = _TARGET_PASS_BATCH.get(torch.device(device).type, 512)
    return reference_batch_size * max(1, target // reference_batch_size)


def split_minibatch(batch: Sequence[Any], default_task: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, task labels)`` of a minibatch; the task labels are its last element, as
    Avalanche reads them (``[x, y]``: every sample of ``default_task``)."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            "SPG's importance pass expects minibatches [x, y] or [x, y, ..., task_labels]; got "
            f"{type(batch).__name__}"
        )
    x, y = batch[0], batch[1]
    if len(batch) < 3:
        return x, y, torch.full((len(y),), default_task, dtype=torch.long)
    t = batch[-1]
    if (
        not isinstance(t, Tensor)
        or t.shape != (len(y),)
        or t.dtype.is_floating_point
        or t.dtype.is_complex
    ):
        described = (
            f"a {t.dtype} tensor of shape {tuple(t.shape)}"
            if isinstance(t, Tensor)
            else type(t).__name__
        )
        raise ValueError(
            "SPG's importance pass reads a minibatch's task labels from its last element (as "
            f"Avalanche does); expected an integer tensor of {len(y)} labels, got {described}"
        )
    return x, y, t


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_pass_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """``ValueError`` naming them unless every tensor of ``params`` is a parameter of ``model``
    that requires a gradient: another model's parameter (a copy) never gets a gradient from
    this model's loss, so its importance would be 0, silently."""
    own = {id(p) for p in model.parameters()}
    foreign = [name for name, p in params.items() if id(p) not in own]
    if foreign:
        raise ValueError(
            f"feature_params holds tensors that are not parameters of the model: {foreign[:5]} "
            "(of a copy of the model, say); their importance would be 0"
        )
    frozen = [name for name, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"feature_params holds parameters that do not require a gradient: {frozen[:5]}; "
            "pass trainable parameters only"
        )


def checked_positions(
    dataset: Any, indices: Sequence[int] | None, total_samples: int | None
) -> tuple[int, list[int]]:
    """``(size of the experience, positions this process handles)`` of an importance pass,
    checked: ``total_samples`` (default ``len(dataset)``) at most ``len(dataset)``, and
    ``indices`` (default all) distinct positions below it. A position outside, or twice,
    would give samples the weight of another reference minibatch, or count them twice."""
    size = len(dataset)
    if total_samples is None:
        n_total = size
    else:
        _check_count("total_samples", total_samples, minimum=0)
        if total_samples > size:
            raise ValueError(f"total_samples={total_samples} exceeds the dataset's {size} samples")
        n_total = total_samples
    if indices is None:
        return n_total, list(range(n_total))
    positions = []
    for position in indices:
        try:
            positions.append(operator.index(position))
        except TypeError:
            raise ValueError(f"indices must be ints, got {position!r}") from None
    outside = [i for i in positions if not 0 <= i < n_total]
    if outside:
        raise ValueError(
            f"indices must be positions in [0, {n_total}) (total_samples), got {outside[:5]}"
        )
    if len(set(positions)) != len(positions):
        repeated = sorted({i for i in positions if positions.count(i) > 1})
        raise ValueError(f"indices must be distinct, got {repeated[:5]} more than once")
    return n_total, positions


def _sum_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


class _Batches:
    """The pass's minibatches on the device, with the reference weight of every sample."""

    def __init__(
        self,
        loader: DataLoader,
        weights: Tensor,
        device: torch.device,
        default_task: int,
    ) -> None:
        self.loader = loader
        self.weights = weights.to(device)  # moved once, not per batch
        self.device = device
        self.default_task = default_task

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, list[int]]]:
        """``(x, y, task labels, weights, sorted distinct task labels)`` per minibatch."""
        start = 0
        for batch in self.loader:
            x, y, t = split_minibatch(batch, self.default_task)
            # The distinct tasks are read on the host, before the transfer: no device sync.
            tasks = torch.unique(t.cpu()).tolist()
            x = x.to(self.device)
            y = y.to(self.device)
            t = t.to(self.device)
            w = self.weights[start : start + len(y)]
            start += len(y)
            yield x, y, t, w, tasks


class _Pass:
    """What every loop of the pass needs: the model call and the feature parameters."""

    def __init__(
        self,
        model: nn.Module,
        forward: ModelForward,
        state: ModelState,
        batches: _Batches,
        params: list[nn.Parameter],
        old_heads: list[int],
    ) -> None:
        self.model = model
        self.old_heads = old_heads
        self.forward = forward
        self.state = state
        self.batches = batches
        self.params = params
        #: Whether the fast pass has checked that all heads see the same features (once per
        #: pass, for every old head, whatever the grouping of the heads).
        self.probed = False

    def call(self, x: Tensor, task_labels: Tensor) -> Tensor:
        """The model's output, called by the convention, on the state of the snapshot."""
        self.state.reset_volatile()
        return self.forward(self.model, x, task_labels)

    def current_loss(self, x: Tensor, y: Tensor, t: Tensor, w: Tensor) -> Tensor:
        """The reference's batch-mean cross-entropy in per-sample form, ``sum_i w_i CE_i``
        (``w_i``: ``1 / len(reference minibatch)``): exact for a smaller last minibatch and
        any batching of the samples."""
        return (F.cross_entropy(self.call(x, t), y, reduction="none").to(w.dtype) * w).sum()

    def old_head_loss(self, x: Tensor, t: Tensor, head: int) -> Tensor:
        """Sum of all logits of head ``head`` (every sample labelled ``head``)."""
        return self.call(x, torch.full_like(t, head)).sum()

    def head_loss(self, x: Tensor, y: Tensor, t: Tensor, w: Tensor, head: int | None) -> Tensor:
        """The loss whose gradient is summed for ``head`` (Section 3.1): the current loss for
        ``None``, an older head's logit sum otherwise. The one place that chooses."""
        return self.current_loss(x, y, t, w) if head is None else self.old_head_loss(x, t, head)


# ------------------------------------------------------------------------------ entry point
def compute_gamma(
    model: nn.Module,
    dataset: Dataset,
    feature_params: Mapping[str, nn.Parameter],
    current_tasks: Sequence[int],
    previous_tasks: Sequence[int],
    *,
    device: torch.device | str,
    reference_batch_size: int,
    method: ImportanceMethod = "fast",
    pass_batch_size: int | None = None,
    indices: Sequence[int] | None = None,
    total_samples: int | None = None,
    grad_reducer: GradReducer | None = None,
    num_workers: int = 0,
    vectorize_heads: bool = False,
    forward: ModelForward | None = None,
    classifier: nn.Module | None | Literal["auto"] = "auto",
    sum_memory_budget: int | None = DEFAULT_SUM_MEMORY_BUDGET,
) -> dict[str, Tensor]:
    """Compute ``gamma`` (max over heads of ``|tanh(standardise(G))|``) for one experience.

    :param model: the model as it is at the end of the experience. It is left exactly as it was
        found (flags, buffers, plain attributes; see :class:`ModelState`); its ``.grad`` are
        zeroed (set to ``None``) before and after.
    :param dataset: the experience's training data, yielding ``[x, y]`` or
        ``[x, y, ..., task_labels]``.
    :param feature_params: the feature-extractor parameters, by name; importance is computed for
        these only.
    :param current_tasks: the task label(s) of the experience just trained: their samples use
        their own head with cross-entropy.
    :param previous_tasks: the task labels of earlier experiences (excluding current ones): each
        contributes the sum of its head's logits over the current data. Pass none for a model
        without task heads.
    :param device: where the forward/backward passes run.
    :param reference_batch_size: the minibatch size whose per-minibatch means are summed (the
        training minibatch size in the reference).
    :param method: ``"fast"`` (shared forward, feature-only gradients, larger batches) or
        ``"reference"`` (the straightforward per-head loop). See the module docstring.
    :param pass_batch_size: minibatch size of the fast pass (default:
        :func:`default_pass_batch_size`). The result does not depend on it (up to float
        rounding); ignored when a module uses batch statistics (see the module docstring).
    :param indices: positions in ``dataset`` this process handles (default: all). Weights are
        taken from the *global* position, so per-rank sums add up to the single-process sum.
    :param total_samples: size of the whole experience when ``indices`` is a shard.
    :param grad_reducer: called on each head's list of summed gradients before standardisation
        (e.g. an all-reduce across ranks).
    :param num_workers: DataLoader workers for the pass.
    :param vectorize_heads: fast pass only: run the per-head backward passes as one batched
        (``vmap``) call per minibatch instead of a loop. Same result up to rounding; off by
        default because whether it is faster depends on the model and the device (see
        ``benchmarks/results/perf.md``). Falls back to the loop if the model uses an
        operation without a batching rule.
    :param forward: the calling convention, ``forward(model, x, task_labels)`` with one label
        per sample. ``None``: Avalanche's (:func:`avalanche_convention`); older heads are then
        ignored for a model that takes no task labels.
    :param classifier: fast pass only: the multi-head classifier the model calls on the
        features shared by all heads, as ``classifier(features, task_labels)``; head ``j``'s
        logits are ``classifier(features, j)``. ``None``: no shared forward. ``"auto"``:
        Avalanche's single ``MultiHeadClassifier`` inside the model, if there is one.
    :param sum_memory_budget: fast pass only: the most bytes of per-head summed gradients held
        at once; heads are processed in groups that fit (at least one head per group). ``None``:
        all heads at once. Same result bit for bit (without dropout).
    :return: ``{name: gamma}`` for every feature parameter, float32, shaped like the parameter.
    :raises ValueError: naming the argument and the value, before the model is run: sizes that
        are not positive ints, ``feature_params`` that are not trainable parameters of
        ``model``, ``indices`` outside ``total_samples`` or repeated, ``previous_tasks``
        without a head in the model's ``MultiHeadClassifier``.
    """
    _check_count("reference_batch_size", reference_batch_size)
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', got {method!r}")
    if pass_batch_size is not None:
        _check_count("pass_batch_size", pass_batch_size)
    if sum_memory_budget is not None:
        _check_count("sum_memory_budget", sum_memory_budget)
    check_pass_parameters(model, feature_params)
    n_total, positions = checked_positions(dataset, indices, total_samples)
    current = [int(t) for t in current_tasks]
    previous = [int(t) for t in previous_tasks if int(t) not in current]
    if forward is None:
        forward, task_aware = avalanche_convention(model)
        previous = previous if task_aware else []
    for name, missing in missing_task_heads(model, previous).items():
        raise ValueError(
            f"previous_tasks {missing} have no head in the model's MultiHeadClassifier "
            f"{name!r}; the importance pass back-propagates every earlier head's logits"
        )
    if isinstance(classifier, str):
        if classifier != "auto":
            raise ValueError(f"classifier must be a module, None or 'auto', got {classifier!r}")
        classifier = find_multihead_classifier(model)
    device = torch.device(device)
    names = list(feature_params)
    params = [feature_params[n] for n in names]
    heads: list[int | None] = [*previous, None]  # None: "each sample's own (current) head"
    default_task = current[0] if current else 0

    max_abs_z: list[Tensor | None] = [None] * len(params)
    with preserved_model_state(model) as state, torch.enable_grad():
        enter_pass_mode(model)
        exact_batches = method == "reference" or uses_batch_statistics(model, state)
        if exact_batches:
            batch_size = reference_batch_size
        else:
            batch_size = pass_batch_size or default_pass_batch_size(reference_batch_size, device)
        loader = DataLoader(
            Subset(dataset, positions),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
            num_workers=num_workers,
        )
        weights = reference_sample_weights(
            positions, reference_batch_size, n_total, dtype=loss_dtype(device)
        )
        batches = _Batches(loader, weights, device, default_task)
        run = _Pass(model, forward, state, batches, params, previous)

        def fold(head_sums: list[Tensor]) -> None:
            if grad_reducer is not None:
                grad_reducer(head_sums)
            for index, summed in enumerate(head_sums):
                max_abs_z[index] = _fold_abs_z(max_abs_z[index], summed)
            head_sums.clear()  # each head's sums are consumed (and freed) as soon as folded

        model.zero_grad(set_to_none=True)
        try:
            if method == "reference":
                for head in heads:  # one head's sums at a time
                    head_sums = _zero_sums(params)
                    _reference_loop(run, head, head_sums)
                    fold(head_sums)
            else:
                tap = classifier if len(heads) > 1 else None
                if tap is not None:
                    inside = {id(p) for p in tap.parameters()}
                    if any(id(p) in inside for p in params):
                        tap = None  # a "feature" parameter behind the tap: h would not reach it
                for group in _head_groups(len(heads), params, sum_memory_budget):
                    group_heads = [heads[i] for i in group]
                    sums = [_zero_sums(params) for _ in group_heads]
                    tap = _fast_loop(run, tap, group_heads, sums, vectorize_heads, exact_batches)
                    for head_sums in sums:
                        fold(head_sums)
        finally:
            model.zero_grad(set_to_none=True)

    gamma: dict[str, Tensor] = {}
    for name, param, value in zip(names, params, max_abs_z):
        if value is None:
            gamma[name] = standardized_importance(None, like=param)  # zeros
        else:
            gamma[name] = value.tanh_().clamp_(max=_below_one(value.device))
    return gamma


def _zero_sums(params: list[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros(p.shape, dtype=_sum_dtype(p), device=p.device) for p in params]


def _head_groups(n_heads: int, params: list[nn.Parameter], budget: int | None) -> list[list[int]]:
    """Consecutive groups of head indices whose summed gradients fit in ``budget`` bytes."""
    per_head = sum(p.numel() * _sum_dtype(p).itemsize for p in params)
    size = n_heads if budget is None or per_head == 0 else max(1, budget // per_head)
    return [list(range(i, min(n_heads, i + size))) for i in range(0, n_heads, size)]


def _below_one(device: torch.device) -> Tensor:
    one = torch.ones((), dtype=torch.float32, device=device)
    return torch.nextafter(one, torch.zeros_like(one))


def _fold_abs_z(running: Tensor | None, summed: Tensor) -> Tensor | None:
    """``max(running, |standardise(summed)|)``, in place in ``summed`` (which it consumes).

    :func:`avalanche_spg.importance.standardized_importance` computes, per head,
    ``|tanh((G - mean) / std)|`` clamped below 1, with all its guards, and the pass then takes
    the elementwise max over heads: about a dozen passes over every parameter per head, as
    many as the head's backward pass on a small experience makes. Here each head
    only contributes ``|z|`` to a running maximum and ``tanh``/clamp run once at the end:
    ``max_j |tanh(z_j)| = tanh(max_j |z_j|)`` since ``tanh`` is odd and increasing (and its
    float implementation is odd and monotone, so the values are the same). The operations on
    ``z`` are the same as there (``G.float()``, ``G.mean()``, ``G.std()``, subtract, divide).

    Usability as in ``docs/algorithm.md``: at least 2 elements, all finite, not all zero, std
    finite and > 0. A finite, positive std implies the other two (an infinite or NaN element
    makes the std NaN; all zeros make it 0), so only the std is checked. Unusable:
    ``running`` unchanged.
    """
    if summed.numel() < 2:
        return running
    z = summed.detach().float()
    std = z.std()
    if not (bool(torch.isfinite(std)) and float(std) > 0.0):
        return running
    z.sub_(z.mean()).div_(std).abs_()
    if running is None:
        return z
    return torch.maximum(running, z, out=running)


# ----------------------------------------------------------------------------- reference loop
def _reference_loop(run: _Pass, head: int | None, head_sums: list[Tensor]) -> None:
    """One head: one forward and ``backward()`` per minibatch, gradients summed."""
    run.model.zero_grad(set_to_none=True)
    for x, y, t, w, _ in run.batches:
        loss = run.head_loss(x, y, t, w, head)
        loss.backward()
        for param, acc in zip(run.params, head_sums):
            if param.grad is not None:
                acc.add_(param.grad)
                param.grad = None
    run.model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- fast path
class _TapMismatch(Exception):
    """The model's output is not its classifier's output on the captured features."""


def _fast_loop(
    run: _Pass,
    classifier: nn.Module | None,
    heads: list[int | None],
    sums: list[list[Tensor]],
    vectorize_heads: bool,
    exact_batches: bool,
) -> nn.Module | None:
    """Fill ``sums`` (one list per head); returns the classifier if tapping it worked (so the
    next group of heads tries it again), ``None`` if the shared-batch loop was needed."""
    if classifier is not None:
        try:
            _tapped_loop(run, classifier, heads, sums, vectorize_heads, exact_batches)
            return classifier
        except _TapMismatch:
            for head_sums in sums:
                torch._foreach_zero_(head_sums)
            run.model.zero_grad(set_to_none=True)
            classifier = None
    _shared_batch_loop(run, heads, sums)
    return classifier


class _Tap:
    """Captures the classifier's input during the model's forward and runs single heads."""

    def __init__(self, classifier: nn.Module) -> None:
        self.classifier = classifier
        self.captured: list[Tensor] = []
        self.capturing = True

    def __call__(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.capturing:
            self.captured.append(args[0])

    def head(self, features: Tensor, task: int) -> Tensor:
        """Head ``task``'s logits on ``features`` (not captured)."""
        self.capturing = False
        try:
            return self.classifier(features, task)
        finally:
            self.capturing = True

    def forward(
        self, run: _Pass, x: Tensor, labels: Tensor, task: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(h, detached h, model output as a function of the detached h)`` for a minibatch
        whose samples all have label ``task``."""
        self.captured.clear()
        out = run.call(x, labels)
        if len(self.captured) != 1:
            raise _TapMismatch
        h = self.captured.pop()
        head_input = h.detach().requires_grad_(True)
        return h, head_input, _as_model_output(self.head(head_input, task), out)


def _as_model_output(own: Tensor, out: Tensor) -> Tensor:
    """``own`` (a head's logits) as the model returned them: the same values, possibly padded
    with zero columns to a common width (Avalanche's multi-task forward does so), in the
    output's dtype. Anything else: :class:`_TapMismatch`."""
    if (
        not isinstance(out, Tensor)
        or own.dim() != 2
        or out.dim() != 2
        or own.shape[0] != out.shape[0]
        or own.shape[1] > out.shape[1]
    ):
        raise _TapMismatch
    width = own.shape[1]
    logits = own if own.dtype == out.dtype else own.to(out.dtype)
    if not torch.allclose(logits.detach(), out[:, :width].detach(), rtol=1e-5, atol=1e-6):
        raise _TapMismatch
    if width < out.shape[1]:
        if bool(out[:, width:].detach().any()):
            raise _TapMismatch
        logits = F.pad(logits, (0, out.shape[1] - width))
    return logits


def _tapped_loop(
    run: _Pass,
    classifier: nn.Module,
    heads: list[int | None],
    sums: list[list[Tensor]],
    vectorize_heads: bool,
    exact_batches: bool,
) -> None:
    tap = _Tap(classifier)
    vectorize = [vectorize_heads and len(heads) > 1]
    old = [(index, head) for index, head in enumerate(heads) if head is not None]
    handle = classifier.register_forward_pre_hook(tap)
    try:
        for x, y, t, w, tasks in run.batches:
            if not run.probed:
                _probe_shared_features(run, tap, x, t, tasks[0], run.old_heads)
                run.probed = True
            if exact_batches and len(tasks) > 1:
                _mixed_minibatch(run, tap, heads, sums, old, (x, y, t, w), vectorize)
                continue
            features: list[Tensor] = []  # one graph per task group of the minibatch
            cotangents: list[list[Tensor]] = [[] for _ in heads]
            for task in tasks:
                if len(tasks) == 1:
                    xg, yg, tg, wg = x, y, t, w
                else:  # no batch statistics: a group's samples do not see each other
                    rows = (t == task).nonzero().squeeze(1)
                    xg, yg, tg, wg = x[rows], y[rows], t[rows], w[rows]
                h, head_input, logits = tap.forward(run, xg, tg, task)
                for index, head in enumerate(heads):
                    if head is None:
                        # The current head's loss, on the logits just checked to be the model's.
                        ce = F.cross_entropy(logits, yg, reduction="none")
                        loss = (ce.to(wg.dtype) * wg).sum()
                    else:
                        loss = tap.head(head_input, head).sum()
                    cotangents[index].append(_cotangent(loss, head_input))
                features.append(h)
            _feature_backward(features, cotangents, run.params, sums, vectorize)
    finally:
        handle.remove()


def _probe_shared_features(
    run: _Pass, tap: _Tap, x: Tensor, t: Tensor, task: int, old_heads: list[int]
) -> None:
    """Check that the classifier's input does not depend on the task label, on a few samples
    labelled ``task`` and then each old head: the tap hands head ``j`` the features computed
    for another head, which is only right if the feature extractor is shared (a progressive
    network's column per task is not). Every call sees the same random numbers (dropout),
    which are rewound afterwards, so the pass draws the same ones as without the probe.
    Different: :class:`_TapMismatch`."""
    if not old_heads:
        return
    xs, ts = x[:_PROBE_SAMPLES], t[:_PROBE_SAMPLES]
    with _rewound_randomness(x.device) as rewind, torch.no_grad():
        shared = None
        for label in [task, *old_heads]:
            rewind()
            tap.captured.clear()
            run.call(xs, torch.full_like(ts, label))
            if len(tap.captured) != 1:
                raise _TapMismatch
            features = tap.captured.pop()
            if shared is None:
                shared = features
            elif features.shape != shared.shape or not torch.allclose(
                features, shared, rtol=1e-5, atol=1e-6
            ):
                raise _TapMismatch


@contextmanager
def _rewound_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields a function that puts the random number generators (CPU, and the CUDA device's)
    back to their state on entry; they are put back on exit too."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    try:
        yield rewind
    finally:
        rewind()


def _mixed_minibatch(
    run: _Pass,
    tap: _Tap,
    heads: list[int | None],
    sums: list[list[Tensor]],
    old: list[tuple[int, int]],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    vectorize: list[bool],
) -> None:
    """A minibatch mixing task labels on a model with batch statistics, seen as in the
    reference: the current head through one call with the per-sample labels (grouped by the
    model as in training), the old heads through one shared call with the whole minibatch."""
    x, y, t, w = batch
    if None in heads:
        loss = run.current_loss(x, y, t, w)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, run.params, allow_unused=True)
            _add_grads(sums[heads.index(None)], list(grads))
    if not old:
        return
    first = old[0][1]
    h, head_input, _ = tap.forward(run, x, torch.full_like(t, first), first)
    cotangents = [[_cotangent(tap.head(head_input, head).sum(), head_input)] for _, head in old]
    _feature_backward([h], cotangents, run.params, [sums[i] for i, _ in old], vectorize)


def _cotangent(loss: Tensor, head_input: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss, head_input, allow_unused=True)
    return torch.zeros_like(head_input) if grad is None else grad


def _feature_backward(
    features: list[Tensor],
    cotangents: list[list[Tensor]],
    params: list[nn.Parameter],
    sums: list[list[Tensor]],
    vectorize: list[bool],
) -> None:
    """Add every head's ``J^T cotangent`` (feature parameters only) to its sums."""
    n_heads = len(cotangents)
    done = 0
    if vectorize[0]:
        rows = sum(len(h) for h in features)
        chunk = max(1, min(n_heads, _MAX_BATCHED_ROWS // max(1, rows)))
        try:
            while done < n_heads:
                stop = min(n_heads, done + chunk)
                stacked = [
                    torch.stack([cotangents[i][g] for i in range(done, stop)])
                    for g in range(len(features))
                ]
                grads = torch.autograd.grad(
                    features,
                    params,
                    grad_outputs=stacked,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
                for offset, head_sums in enumerate(sums[done:stop]):
                    _add_grads(head_sums, [None if g is None else g[offset] for g in grads])
                done = stop
            return
        except RuntimeError:
            # An operation without a batching rule: the loop below gives the same result.
            vectorize[0] = False
    for index in range(done, n_heads):
        grads = torch.autograd.grad(
            features,
            params,
            grad_outputs=cotangents[index],
            retain_graph=index < n_heads - 1,
            allow_unused=True,
        )
        _add_grads(sums[index], list(grads))


def _add_grads(head_sums: list[Tensor], grads: list[Tensor | None]) -> None:
    pairs = [(acc, g) for acc, g in zip(head_sums, grads) if g is not None]
    if not pairs:
        return
    accs = [acc for acc, _ in pairs]
    values = [g if g.dtype == acc.dtype else g.to(acc.dtype) for acc, g in pairs]
    torch._foreach_add_(accs, values)


def _shared_batch_loop(run: _Pass, heads: list[int | None], sums: list[list[Tensor]]) -> None:
    """Without a classifier to tap: one forward per head on the (possibly larger) minibatch,
    gradients of the feature parameters only."""
    for x, y, t, w, _ in run.batches:
        for index, head in enumerate(heads):
            loss = run.head_loss(x, y, t, w, head)
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, run.params, allow_unused=True)
            _add_grads(sums[index], list(grads))
