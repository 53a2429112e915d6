"""Training protocols: ``quick`` (fixed epochs, for CPUs) and ``paper`` (the SPG paper's).

``quick``
    A fixed number of epochs per task (``--epochs``, default 5; 10 at batch 32 on the small
    digits streams), plain SGD (no momentum, no weight decay) with one learning rate for every
    method, no validation split. Backbones:
    :class:`~avalanche_spg.models.MultiHeadMLP` with two hidden layers (64-64 for the 8x8
    digits, 256-256 for the 28x28 MNIST-likes) and, for the 32x32 colour datasets,
    :class:`~avalanche_spg.models.AlexNetLike` narrowed to 512 hidden units without dropout.

``paper``
    The SPG paper's experimental setup (its Section 4 and appendix): the AlexNet-like backbone (for
    the 8x8 digits, which are too small for its convolutions, the 256-256 MLP), SGD lr 0.25, batch
    64, a fresh optimizer (and lr) for every task, 10 % of each task's training data held out for
    validation, ``ReduceLROnPlateau`` on the validation loss (factor 1/3, patience 4, minimum lr
    1e-3), early stop once the lr is at its floor and the validation loss has not improved for 5
    epochs (at most 500 epochs), and the best-validation weights restored at the end of every
    experience (the starting weights when no epoch's validation loss was finite) — by
    :class:`benchmarks.plugins.PlateauEarlyStopping`, which the suite places *before*
    ``SPGPlugin`` so that SPG's importance is computed on the restored weights. Dropout:
    the paper's tuned values for C-10/C-20/T-10/T-20, the backbone defaults elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "PAPER_DROPOUT",
    "BACKBONES",
    "backbone_description",
    "make_backbone",
    "resolve_backbone",
    "protocol_settings",
]

PROTOCOLS = ("quick", "paper")

#: The SPG paper's tuned dropout (drop1, drop2) per sequence (its experimental setup).
PAPER_DROPOUT: dict[str, tuple[float, float]] = {
    "c10": (0.3135, 0.4093),
    "c20": (0.4956, 0.4850),
    "t10": (0.1249, 0.4344),
    "t20": (0.3875, 0.4423),
}


@dataclass(frozen=True)
class Protocol:
    """Resolved training settings of one protocol (CLI options already applied)."""

    name: str
    epochs: int
    lr: float
    batch_size: int
    eval_batch_size: int
    validation_fraction: float
    plateau: bool


def protocol_settings(
    name: str,
    *,
    source: str = "",
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
) -> Protocol:
    """Defaults of protocol ``name`` (for data ``source``) with the CLI overrides applied.

    ``quick`` trains 5 epochs at batch 64, except on the digits (about 270 training images per
    task), where it trains 10 epochs at batch 32 so that every task is actually learned.
    """
    if name == "quick":
        small = source == "digits"
        return Protocol(
            name="quick",
            epochs=epochs if epochs is not None else (10 if small else 5),
            lr=lr if lr is not None else 0.1,
            batch_size=batch_size if batch_size is not None else (32 if small else 64),
            eval_batch_size=eval_batch_size if eval_batch_size is not None else 1024,
            validation_fraction=0.0,
            plateau=False,
        )
    if name == "paper":
        return Protocol(
            name="paper",
            epochs=epochs if epochs is not None else 500,
            lr=lr if lr is not None else 0.25,
            batch_size=batch_size if batch_size is not None else 64,
            eval_batch_size=eval_batch_size if eval_batch_size is not None else 1024,
            validation_fraction=0.1,
            plateau=True,
        )
    raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")


BACKBONES = ("auto", "mlp", "alexnet", "resnet")


def resolve_backbone(backbone: str, protocol: str, input_shape: Sequence[int]) -> str:
    """The concrete backbone (``mlp``, ``alexnet`` or ``resnet``) that ``backbone`` names.

    ``auto`` is the protocol's own choice: the MLP for the 8x8 digits (too small for the
    AlexNet-like convolutions) and, under ``quick``, for the one-channel 28x28 images; the
    AlexNet-like CNN otherwise.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid: {', '.join(BACKBONES)}")
    channels, height = int(input_shape[0]), int(input_shape[1])
    if backbone == "auto":
        if height < 12 or (protocol == "quick" and channels == 1):
            return "mlp"
        return "alexnet"
    if backbone == "alexnet" and height < 12:
        raise ValueError(
            f"the AlexNet-like backbone needs images of at least 12x12; this benchmark's are "
            f"{height}x{height}: use --backbone mlp"
        )
    return backbone


def backbone_description(backbone: str, protocol: str, input_shape: Sequence[int]) -> str:
    """The backbone in words, for settings and tables (mirrors :func:`make_backbone`)."""
    kind = resolve_backbone(backbone, protocol, input_shape)
    n_inputs = int(math.prod(input_shape))
    if kind == "mlp":
        small = int(input_shape[1]) < 10 and protocol == "quick"
        return f"MLP {n_inputs}-{'64-64' if small else '256-256'}"
    if kind == "alexnet":
        if protocol == "quick":
            return "AlexNet-like (512 hidden, no dropout)"
        return "AlexNet-like (2048 hidden, paper dropout)"
    return "MTSlimResNet18 (nf 20, BatchNorm; inputs padded to 32x32, 3 channels)"


def make_backbone(
    protocol: str,
    benchmark: str,
    input_shape: Sequence[int],
    n_classes: int,
    backbone: str = "auto",
) -> nn.Module:
    """The multi-head backbone of ``protocol`` for a benchmark (heads sized ``n_classes``).

    ``backbone``: ``auto`` (the protocol's choice, see :func:`resolve_backbone`), ``mlp``,
    ``alexnet`` or ``resnet`` (Avalanche's ``MTSlimResNet18``, a BatchNorm ResNet).
    """
    from avalanche_spg.models import AlexNetLike, MultiHeadMLP

    kind = resolve_backbone(backbone, protocol, input_shape)
    n_inputs = int(math.prod(input_shape))
    if kind == "mlp":
        small = int(input_shape[1]) < 10 and protocol == "quick"
        hidden = (64, 64) if small else (256, 256)
        return MultiHeadMLP(n_inputs, hidden, initial_out_features=n_classes)
    if kind == "resnet":
        from benchmarks._resnet import SlimResNetBackbone

        return SlimResNetBackbone(input_shape, n_classes)
    if protocol == "quick":
        return AlexNetLike(
            tuple(input_shape), drop1=0.0, drop2=0.0, hidden=512, initial_out_features=n_classes
        )
    drop1, drop2 = PAPER_DROPOUT.get(benchmark, (0.2, 0.5))
    return AlexNetLike(tuple(input_shape), drop1, drop2, initial_out_features=n_classes)
