"""The suite's BatchNorm backbone: Avalanche's ``MTSlimResNet18`` on the benchmarks' images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from avalanche.models import MTSlimResNet18, MultiTaskModule
from torch import Tensor
from torch.nn import functional as F

__all__ = ["SlimResNetBackbone"]


class SlimResNetBackbone(MultiTaskModule):
    """Avalanche's ``MTSlimResNet18`` (BatchNorm ResNet-18 with 20 base filters, one
    ``MultiHeadClassifier`` head per task) on images of any size up to 32x32: they are
    zero-padded to 32x32 and a one-channel image is repeated to three channels, as the
    network's first layer expects.

    The whole minibatch goes through the network at once (its BatchNorm layers see every
    sample, whatever its task), exactly as ``MTSlimResNet18.forward`` does.

    :param input_shape: ``(channels, height, width)`` of the benchmark's images.
    :param n_classes: units of a new head before it sees its classes.
    """

    def __init__(self, input_shape: Sequence[int], n_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
        channels, height, width = (int(v) for v in input_shape)
        if channels not in (1, 3) or not (0 < height <= 32 and 0 < width <= 32):
            raise ValueError(
                f"the ResNet backbone takes 1- or 3-channel images up to 32x32, got "
                f"{tuple(input_shape)}"
            )
        self.input_shape = (channels, height, width)
        self.net = MTSlimResNet18(n_classes)

    def _to_32x32_rgb(self, x: Tensor) -> Tensor:
        channels, height, width = self.input_shape
        x = x.reshape(x.shape[0], channels, height, width)
        top, left = (32 - height) // 2, (32 - width) // 2
        x = F.pad(x, (left, 32 - width - left, top, 32 - height - top))
        return x.repeat(1, 3, 1, 1) if channels == 1 else x

    def forward(self, x: Tensor, task_labels: Any) -> Tensor:
        """Logits of each sample's own head (``task_labels``: an int or one label per sample)."""
        return self.net(self._to_32x32_rgb(x), task_labels)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        """Logits of head ``task_label`` for the whole minibatch."""
        return self.net(self._to_32x32_rgb(x), task_label)
