"""GPU placement (run when CUDA is available, skipped otherwise): importance and the mask
factors live on the parameters' CUDA device, and masked gradients are exact on the GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import CallbackProbe, GradRecorder, make_mlp, make_naive

from avalanche_spg import SPGPlugin

DEVICE = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cuda_strategy(plugins: list[Any]) -> tuple[Any, Any]:
    model = make_mlp(hidden=(32, 16)).to(DEVICE)
    return model, make_naive(model, plugins, device=DEVICE)


def test_importance_and_factors_live_on_the_parameters_device(digits_til_small: Any) -> None:
    plugin = SPGPlugin()
    devices: list[set[str]] = []

    def record_devices(strategy: Any) -> None:
        devices.append({v.device.type for v in plugin.importance.values()})

    model, strategy = _cuda_strategy([plugin, CallbackProbe(before_update=record_devices)])
    for experience in digits_til_small.train_stream[:3]:
        strategy.train(experience)
    params = dict(model.named_parameters())
    assert plugin.importance
    for name, value in plugin.importance.items():
        assert value.device == params[name].device, name
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
        assert float(value.max()) < 1.0
    # during the masked experiences, A (and so 1 - A) was already on the GPU
    assert devices and all(d == {"cuda"} for d in devices if d)
    assert isinstance(plugin.head_scale, float)
    # the state is plain CPU data
    assert all(v.device.type == "cpu" for v in plugin.state_dict()["importance"].values())


def test_masked_gradients_are_exact_on_gpu(digits_til_small: Any) -> None:
    raw, masked = GradRecorder(), GradRecorder()
    plugin = SPGPlugin()
    model, strategy = _cuda_strategy([raw, plugin, masked])
    strategy.train(digits_til_small.train_stream[0])
    importance = {n: v.clone() for n, v in plugin.importance.items()}
    scale = plugin.head_scale
    strategy.train(digits_til_small.train_stream[1])
    checked = 0
    for before, after in zip(raw.records[1], masked.records[1]):
        for name, grad in before.items():
            if grad is None:
                continue
            assert grad.is_cuda and after[name].is_cuda
            if name.startswith("classifier."):
                expected = grad * scale
            else:
                expected = (1 - importance[name].to(grad.device)) * grad
            assert torch.equal(after[name], expected), name
            checked += 1
    assert checked > 0
