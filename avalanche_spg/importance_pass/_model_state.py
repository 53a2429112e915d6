"""What the importance pass preserves of the model, and the mode it runs it in.

The pass runs on the model as training left it and leaves it exactly so: :class:`ModelState`
snapshots every module's train/eval flag, its buffers and its plain tensor and number attributes
(the paper's importance, Section 3.1, is a function of the trained model; computing it must not
change the model). See the package docstring, "The model's state".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "ModelState",
    "enter_pass_mode",
    "preserve_train_flags",
    "preserved_model_state",
    "uses_batch_statistics",
]


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
    entirely in eval mode, train mode everywhere (the package docstring, "The model's state")."""
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
