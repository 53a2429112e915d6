"""Backbones for task-incremental learning: a shared feature extractor plus one head per task.

* :class:`AlexNetLike` — the backbone of the SPG paper's experiments (its experimental setup):
  three convolutions and two 2048-unit linear layers, no batch norm, dropout after every ReLU.
* :class:`MultiHeadMLP` — a small fully connected network for quick CPU runs.

Both are Avalanche ``MultiTaskModule`` s whose classifier is a ``MultiHeadClassifier``: a new
head is created automatically for every new task label.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

__all__ = ["AlexNetLike", "MultiHeadMLP", "count_parameters"]


def _check_dropout(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and 0.0 <= value < 1.0)
    ):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _size(name: str, value: Any) -> int:
    """``value`` as a layer size: an int >= 1 (not a bool, not a float), else ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    try:
        size = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}") from None
    if size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return size


class AlexNetLike(MultiTaskModule):
    """AlexNet-like multi-head CNN of the SPG paper (and of HAT, Serra et al. 2018).

    ``conv(64, k=s//8) → ReLU → dropout1 → maxpool2 → conv(128, k=s//10) → ReLU → dropout1 →
    maxpool2 → conv(256, k=2) → ReLU → dropout2 → maxpool2 → flatten → linear(2048) → ReLU →
    dropout2 → linear(2048) → ReLU → dropout2 → head of the task``. For 32×32×3 inputs the
    feature extractor has about 6.5 M parameters.

    :param input_shape: ``(channels, height, width)``, square images; ``s`` above is the height
        (at least 12: smaller images vanish in the three poolings).
    :param drop1: dropout after the first two convolutions (the paper tunes it per sequence).
    :param drop2: dropout after the third convolution and the linear layers.
    :param hidden: width of the two linear layers (2048 in the paper).
    :param initial_out_features: units of a new head before it sees its classes.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        drop1: float = 0.2,
        drop2: float = 0.5,
        hidden: int = 2048,
        initial_out_features: int = 2,
    ) -> None:
        super().__init__()
        if isinstance(input_shape, (str, bytes)) or len(input_shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
        channels, size, width = (_size("input_shape", v) for v in input_shape)
        _check_dropout("drop1", drop1)
        _check_dropout("drop2", drop2)
        hidden = _size("hidden", hidden)
        if size < 12 or width < 12:
            raise ValueError(f"AlexNetLike needs images of at least 12x12, got {input_shape!r}")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, kernel_size=size // 8),
            nn.ReLU(),
            nn.Dropout(drop1),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=size // 10),
            nn.ReLU(),
            nn.Dropout(drop1),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, kernel_size=2),
            nn.ReLU(),
            nn.Dropout(drop2),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        try:
            with torch.no_grad():
                flat = self.features(torch.zeros(1, channels, size, width)).shape[1]
        except RuntimeError as error:  # a narrow image: too small for a kernel or a pooling
            raise ValueError(
                f"AlexNetLike cannot take images of input_shape {input_shape!r} (its kernels "
                f"come from the height, {size}): {error}"
            ) from error
        self.fc = nn.Sequential(
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Dropout(drop2),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(drop2),
        )
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=initial_out_features)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """Logits of head ``task_label``."""
        return self.classifier(self.fc(self.features(x)), task_label)


class MultiHeadMLP(MultiTaskModule):
    """A fully connected feature extractor with one linear head per task.

    :param input_size: number of input features (images are flattened).
    :param hidden_sizes: width of each hidden layer.
    :param dropout: dropout after each hidden ReLU (0 disables it).
    :param initial_out_features: units of a new head before it sees its classes.
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        initial_out_features: int = 2,
    ) -> None:
        super().__init__()
        input_size = _size("input_size", input_size)
        if (
            isinstance(hidden_sizes, (str, bytes))
            or not isinstance(hidden_sizes, Sequence)
            or not hidden_sizes
        ):
            raise ValueError(
                f"hidden_sizes must be a non-empty sequence of ints >= 1, got {hidden_sizes!r}"
            )
        hidden_sizes = [_size("hidden_sizes", size) for size in hidden_sizes]
        _check_dropout("dropout", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = MultiHeadClassifier(width, initial_out_features=initial_out_features)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """Logits of head ``task_label``."""
        return self.classifier(self.features(x), task_label)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
