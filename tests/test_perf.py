"""The performance command and the mask step's cost guarantees.

* ``python -m benchmarks.perf --tiny`` runs end to end (so the command cannot rot) and its
  non-timing findings hold: the fast pass equals the reference loop, the memory the plugin holds
  between experiences is its importance buffer only and does not grow with the tasks.
* ``MaskSet``'s head-gradient step keeps ``clip_grad_norm_``'s semantics (total norm clipped to
  the limit, then the head scale) while reusing per-experience buffers and modifying the
  gradients in place; on CUDA it never synchronises with the host.

No assertion here is about time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from avalanche_spg.masking import MaskSet
from benchmarks import perf


# ------------------------------------------------------------------------- the perf command
@pytest.fixture(scope="module")
def tiny_results() -> dict:
    torch.set_num_threads(1)
    return perf.collect(perf.SIZES["tiny"], torch.device("cpu"), log=lambda message: None)


def test_tiny_run_reports_every_part(tiny_results: dict) -> None:
    sizes = perf.SIZES["tiny"]
    assert [r["model"] for r in tiny_results["iteration"]] == list(perf.MODELS)
    for row in tiny_results["iteration"]:
        # the warm-up round is dropped, every other round is paired (one ratio per round)
        assert row["rounds"] == sizes.rounds
        assert row["iterations"] == sizes.iters_per_round - sizes.warmup
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        # timed on the second experience: the model had grown a second head, as large as
        # the first one
        model = perf.setup.make_model(row["model"], sizes, dropout=True)
        (head,) = model.classifier.classifiers.values()
        head_params = sum(p.numel() for p in head.parameters())
        assert row["params"] == sum(p.numel() for p in model.parameters()) + head_params
    assert [(r["model"], r["k"]) for r in tiny_results["importance"]] == [
        (m, k) for m in perf.MODELS for k in sizes.pass_ks
    ]
    assert [(r["model"], r["tasks"]) for r in tiny_results["memory"]] == [
        (m, t) for m in perf.MODELS for t in sizes.memory_after
    ]
    assert [r["fraction"] for r in tiny_results["subset"]] == [1.0, *sizes.subset_fractions]


def test_fast_pass_matches_the_reference_in_the_benchmark(tiny_results: dict) -> None:
    for row in tiny_results["importance"]:
        assert row["heads"] == row["k"] + 1
        diffs = {key: value for key, value in row.items() if key.endswith("_max_diff")}
        assert "fast_max_diff" in diffs
        assert all(value <= 1e-5 for value in diffs.values()), row
    assert any("fast_vectorized_s" in row for row in tiny_results["importance"])
    assert any("fast_batch_8_s" in row for row in tiny_results["importance"])


def test_plugin_holds_only_the_importance_buffer_between_experiences(tiny_results: dict) -> None:
    for model in perf.MODELS:
        rows = [r for r in tiny_results["memory"] if r["model"] == model]
        for row in rows:
            # float32 parameters: one float32 importance per feature element, nothing else
            assert row["tensor_bytes"] == row["importance_bytes"] == row["feature_bytes"]
            assert row["param_refs"] == 0  # no Parameter (nor mask list) kept alive
            assert row["tensor_bytes"] < row["param_bytes"]
        assert len({r["tensor_bytes"] for r in rows}) == 1  # constant in the number of tasks
        assert rows[-1]["param_bytes"] > rows[0]["param_bytes"]  # the model did grow (heads)


def test_importance_max_samples_uses_a_subset(tiny_results: dict) -> None:
    whole, *subsets = tiny_results["subset"]
    assert whole["mean_abs_diff"] == 0.0
    for row in subsets:
        assert row["samples"] < whole["samples"]
        assert 0.0 < row["mean_abs_diff"] < 0.5  # an estimate: close, not identical


def test_command_writes_markdown_with_its_command(tmp_path: Path) -> None:
    out, raw = tmp_path / "perf.md", tmp_path / "perf.json"
    argv = ["--tiny", "--parts", "memory", "--models", "mlp", "--malloc", "default"]
    argv += ["--out", str(out)]
    assert perf.main([*argv, "--json", str(raw)]) == 0
    text = out.read_text()
    assert "python -m benchmarks.perf --tiny --parts memory --models mlp --malloc default" in text
    assert "## (c) Memory held by SPGPlugin between experiences" in text
    assert "## Targets on CPU" in text
    lines = text.splitlines()
    header = lines.index(
        "| model | tasks | plugin tensor bytes | model parameter bytes | ratio "
        "| importance bytes | feature-parameter bytes | refs to model tensors "
        "| other Python objects (bytes) |"
    )
    assert lines[header + 1] == "|---|" + "---:|" * 8
    assert lines[header + 2].startswith("| mlp | 1 | ")
    assert lines[header + 3].startswith("| mlp | 3 | ")
    assert json.loads(raw.read_text())["memory"][0]["tasks"] == 1


def test_module_entry_point_parses_the_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--tiny", "--device", "--threads", "--clock", "--parts", "--models", "--out"):
        assert option in done.stdout
    assert "--json" in done.stdout and "--malloc" in done.stdout


def test_held_memory_counts_storages_once_and_model_tensors_apart() -> None:
    model = nn.Linear(4, 3)
    buffer = torch.zeros(10)

    class Holder:
        def __init__(self) -> None:
            self.a = {"x": buffer, "y": [buffer[2:], model.weight]}
            self.b = (torch.ones(5, dtype=torch.float64), model)
            self.c = [1, 2, 3]

    held = perf.held_memory(Holder(), model)
    assert held["tensor_bytes"] == 10 * 4 + 5 * 8
    assert held["tensors"] == 2
    assert held["param_refs"] == 1


# ----------------------------------------------------------------------------- the mask step
def _heads_and_features(scale_grads: float) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    torch.manual_seed(0)
    features = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5))]
    heads = [
        nn.Parameter(torch.randn(2, 5)),
        nn.Parameter(torch.randn(2)),
        nn.Parameter(torch.randn(3, 5)),
    ]
    for p in [*features, *heads[:2]]:
        p.grad = torch.randn_like(p) * scale_grads
    return features, heads  # heads[2] (an inactive head) has no gradient


@pytest.mark.parametrize("grad_scale", [1.0, 1e5])  # the clip does not fire / fires
def test_head_step_equals_clip_grad_norm_then_scale(grad_scale: float) -> None:
    features, heads = _heads_and_features(grad_scale)
    factors = [torch.rand_like(p) for p in features]
    expected_heads = [nn.Parameter(p.detach().clone()) for p in heads]
    for p, q in zip(heads, expected_heads):
        q.grad = None if p.grad is None else p.grad.clone()
    raw_features = [p.grad.clone() for p in features]
    torch.nn.utils.clip_grad_norm_(expected_heads, 1e4)
    for p in expected_heads:
        if p.grad is not None:
            p.grad.mul_(0.8)
    masks = MaskSet(features, factors, heads, head_scale=0.8, clip_head_grad_norm=1e4)
    masks.mask_gradients()
    for p, raw, factor in zip(features, raw_features, factors):
        assert torch.equal(p.grad, raw * factor)
    assert heads[2].grad is None
    for p, q in zip(heads[:2], expected_heads[:2]):
        if grad_scale == 1.0:
            assert torch.equal(p.grad, q.grad)  # coef is exactly 1: bit for bit grad * scale
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in heads[:2]]))
    if grad_scale > 1.0:
        assert abs(float(norm) - 1e4 * 0.8) < 1e-2


def test_mask_step_works_in_place_and_reuses_its_buffers() -> None:
    features, heads = _heads_and_features(1e5)
    masks = MaskSet(features, [torch.rand_like(p) for p in features], heads, 0.5)
    pointers = [p.grad.data_ptr() for p in [*features, *heads[:2]]]
    masks.mask_gradients()
    buffers = [b.data_ptr() for bs in masks._clip_buffers.values() for b in bs]
    for p in [*features, *heads[:2]]:
        p.grad.normal_().mul_(1e5)
    masks.mask_gradients()
    assert [p.grad.data_ptr() for p in [*features, *heads[:2]]] == pointers
    assert [b.data_ptr() for bs in masks._clip_buffers.values() for b in bs] == buffers
    assert len(buffers) == 2  # the clip coefficient and max norm (the norm is torch's fused one)


def test_head_clipping_off_and_update_mode_clip_only() -> None:
    features, heads = _heads_and_features(1e5)
    raw = [p.grad.clone() for p in heads[:2]]
    MaskSet(features, [torch.ones_like(p) for p in features], heads, 0.5, None).mask_gradients()
    for p, g in zip(heads[:2], raw):
        assert torch.equal(p.grad, g * 0.5)
    features, heads = _heads_and_features(1e5)
    masks = MaskSet(features, [torch.ones_like(p) for p in features], heads, 0.5)
    masks.snapshot()  # update mode: heads are clipped, not scaled
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in heads[:2]]))
    assert abs(float(norm) - 1e4) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_step_never_synchronises_with_the_host_on_cuda() -> None:
    features, heads = _heads_and_features(1e5)
    features = [nn.Parameter(p.detach().cuda()) for p in features]
    heads = [nn.Parameter(p.detach().cuda()) for p in heads]
    for p in [*features, *heads[:2]]:
        p.grad = torch.randn_like(p) * 1e5
    masks = MaskSet(features, [torch.rand_like(p) for p in features], heads, 0.5)
    masks.mask_gradients()  # first call of the experience allocates the clip buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks.mask_gradients()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
