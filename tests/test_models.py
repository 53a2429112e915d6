"""The backbones' constructors refuse arguments they cannot build a network from with a
``ValueError`` naming the argument and the value, instead of a torch error from inside a layer
(or a network without features)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from avalanche_spg.models import AlexNetLike, MultiHeadMLP


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"input_shape": (3, 10, 10)}, r"at least 12x12, got \(3, 10, 10\)"),  # was accepted
        ({"input_shape": (3, 11, 11)}, r"\(3, 11, 11\)"),
        ({"input_shape": (3, 32, 12)}, r"input_shape \(3, 32, 12\)"),  # kernels from height
        ({"input_shape": (3, 32.5, 32)}, "input_shape must be an int >= 1, got 32.5"),
        ({"input_shape": (3, 32)}, r"\(3, 32\)"),
        ({"hidden": 0}, "hidden must be an int >= 1, got 0"),  # was a zero-width network
        ({"hidden": 2.5}, "hidden must be an int >= 1, got 2.5"),
        ({"drop1": "0.2"}, "drop1 must be a number in \\[0, 1\\), got '0.2'"),
        ({"drop2": float("nan")}, "drop2"),
    ],
)
def test_alexnet_like_names_a_bad_argument(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        AlexNetLike(**{"hidden": 8, **kwargs})


def test_the_smallest_alexnet_like_images_work() -> None:
    model = AlexNetLike((3, 12, 12), hidden=8)
    assert model.fc(model.features(torch.zeros(2, 3, 12, 12))).shape == (2, 8)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"hidden_sizes": 256}, "hidden_sizes must be a non-empty sequence of ints >= 1, got 256"),
        ({"hidden_sizes": "64"}, "got '64'"),
        ({"hidden_sizes": (4, 2.5)}, "hidden_sizes must be an int >= 1, got 2.5"),
        ({"input_size": 2.5}, "input_size must be an int >= 1, got 2.5"),
        ({"input_size": True}, "input_size must be an int >= 1, got True"),  # was 1 input
        ({"dropout": "0.1"}, "dropout"),
    ],
)
def test_multi_head_mlp_names_a_bad_argument(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        MultiHeadMLP(**kwargs)
