"""``python -m benchmarks.paper_scale``: the estimate of the paper-scale C-10 / C-20 runs (tiny
synthetic sizes on CPU) and the ``run`` command (refusals, and commands the suite's parser
accepts)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import paper_scale
from benchmarks.cli import build_parser, resolve_settings
from benchmarks.paper_scale import (
    PAPER_METHODS,
    MethodTiming,
    linear_in_k,
    main,
    minimum_epochs,
    run_commands,
    seconds_per_seed,
)

METHODS = ("naive", "spg", "ewc", "spg+replay", "joint")


# ---------------------------------------------------------------------------- estimate
@pytest.fixture(scope="module")
def quick_estimate(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], str]:
    folder = tmp_path_factory.mktemp("paper-scale")
    argv = [
        "estimate",
        "--quick",
        "--device",
        "cpu",
        "--backbone",
        "mlp",
        "--benchmarks",
        "c10",
        "--methods",
        ",".join(METHODS),
        "--assume-epochs",
        "7",
        "--quiet",
        "--json",
        str(folder / "estimate.json"),
        "--out",
        str(folder / "estimate.md"),
    ]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((folder / "estimate.json").read_text())
    return payload, (folder / "estimate.md").read_text()


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``## heading...``."""
    section = text.split(f"## {heading}", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def _seconds(cell: str) -> tuple[float, float]:
    """The interval of seconds a duration cell (``12 s``, ``34 min``, ``5.6 h``) stands for."""
    number, unit = cell.split()
    value, half = float(number), 0.5 if unit != "h" else 0.05
    scale = {"s": 1.0, "min": 60.0, "h": 3600.0}[unit]
    return (value - half) * scale, (value + half) * scale


def _independent_seed_seconds(fields: dict[str, Any], n_tasks: int, epochs: int) -> float:
    """The projection as the module docstring defines it, written out again."""

    def at(name: str, k: int) -> float:
        (k_lo, k_hi), (lo, hi) = fields["ks"], fields[name]
        slope = max(0.0, (hi - lo) / (k_hi - k_lo))
        return max(0.0, lo + slope * (k - k_lo))

    if fields["method"] == "joint":
        return (
            fields["overhead"]
            + epochs * (fields["epoch"][0] + fields["validation"])
            + fields["end_of_task"][0]
            + fields["evaluation"]
        )
    per_task = [
        fields["overhead"]
        + epochs * (at("epoch", k) + fields["validation"])
        + at("end_of_task", k)
        + fields["evaluation"]
        + (at("checkpoint", k) if k < n_tasks - 1 else 0.0)
        for k in range(n_tasks)
    ]
    return sum(per_task)


def test_estimate_sizes_are_c10s_scaled(quick_estimate: tuple[dict[str, Any], str]) -> None:
    payload, _ = quick_estimate
    entry = payload["results"]["c10"]
    # --quick keeps 0.01 of CIFAR-100's 500 training / 100 test images per class: 5 / 1; a task
    # of C-10 has 10 classes, 10 % of its training images held out for validation.
    assert entry["measured_sizes"] == {
        "n_tasks": 10,
        "classes_per_task": 10,
        "train": 45,
        "valid": 5,
        "test": 10,
    }
    assert entry["full_sizes"] == {
        "n_tasks": 10,
        "classes_per_task": 10,
        "train": 4500,
        "valid": 500,
        "test": 1000,
    }
    assert entry["ratio"] == {"train": 100.0, "valid": 100.0, "test": 100.0}
    assert payload["meta"]["ks"] == [1, 2]
    assert payload["meta"]["minimum_epochs"] == 36


def test_estimate_pieces_are_the_scaled_measurements(
    quick_estimate: tuple[dict[str, Any], str],
) -> None:
    payload, _ = quick_estimate
    entry = payload["results"]["c10"]
    ratio = entry["ratio"]
    assert [m["method"] for m in entry["methods"]] == list(METHODS)
    for fields in entry["methods"]:
        raw = fields["raw"]["per_task"]
        keys = ["0", "0"] if fields["method"] == "joint" else ["1", "2"]
        lo, hi = raw[keys[0]], raw[keys[1]]
        assert fields["epoch"] == pytest.approx([lo["epoch"] * 100, hi["epoch"] * 100])
        assert fields["end_of_task"] == pytest.approx(
            [lo["end_of_task"] * ratio["train"], hi["end_of_task"] * ratio["train"]]
        )
        assert fields["validation"] == pytest.approx(
            (lo["validation"] + hi["validation"]) / 2 * ratio["valid"]
        )
        assert fields["evaluation"] == pytest.approx(fields["raw"]["evaluation"] * ratio["test"])
        assert fields["overhead"] == pytest.approx((lo["overhead"] + hi["overhead"]) / 2)
        for piece in (lo, hi):
            # The pieces are disjoint parts of the timed call.
            parts = piece["epoch"] + piece["validation"] + piece["end_of_task"]
            assert piece["epoch"] > 0 and piece["validation"] > 0
            assert parts + piece["overhead"] == pytest.approx(max(piece["call"], parts))
        if fields["method"].startswith("spg"):
            # SPG's importance pass is one of the end-of-task callbacks.
            assert fields["importance_pass"] is not None
            for piece in (lo, hi):
                assert 0 < piece["importance_pass"] <= piece["end_of_task"]
        else:
            assert fields["importance_pass"] is None
        if fields["method"] != "joint":
            assert all(size > 0 for size in fields["checkpoint_bytes"])


def test_estimate_projection_is_the_formula_of_the_pieces(
    quick_estimate: tuple[dict[str, Any], str],
) -> None:
    payload, text = quick_estimate
    projected = payload["projections"]["c10"]
    rows = {row[0]: row for row in _table_rows(text, "c10")}
    assert list(rows) == [*METHODS, "all methods"]
    total = 0.0
    for fields in payload["results"]["c10"]["methods"]:
        method = fields["method"]
        one = _independent_seed_seconds(fields, 10, 7)
        low = _independent_seed_seconds(fields, 10, 36)
        assert projected[method]["seed_seconds"] == pytest.approx(one, rel=1e-9)
        assert projected[method]["seeds_seconds"] == pytest.approx(3 * one, rel=1e-9)
        assert projected[method]["seeds_seconds_minimum"] == pytest.approx(3 * low, rel=1e-9)
        cells = rows[method]
        for cell, seconds in ((cells[-3], one), (cells[-2], 3 * low), (cells[-1], 3 * one)):
            lower, upper = _seconds(cell)
            assert lower <= seconds <= upper, (method, cell, seconds)
        total += 3 * one
    lower, upper = _seconds(rows["all methods"][-1])
    assert lower <= total <= upper
    assert "| method | epoch s |" in text and "7 epochs/task" in text


def test_estimate_refuses_bad_settings() -> None:
    with pytest.raises(SystemExit, match="K_LO < K_HI"):
        main(["estimate", "--quick", "--ks", "3", "1", "--device", "cpu"])
    with pytest.raises(ValueError, match="k_hi=10 is not a task of c10"):
        paper_scale.estimate(["c10"], ["naive"], fraction=0.01, ks=(1, 10))
    with pytest.raises(ValueError, match="packnet"):
        paper_scale.estimate(["c10"], ["packnet"], fraction=0.01)


# ---------------------------------------------------------------------------- projection
def test_minimum_epochs_of_the_paper_schedule() -> None:
    # lr 0.25 reaches the floor 1e-3 after 6 reductions by 1/3 (0.25 / 3**5 = 1.03e-3 is still
    # above it), each after 5 epochs without improvement (patience 4): at epoch 1 + 6 * 5 = 31;
    # then 5 more epochs without improvement stop the task: 36.
    assert minimum_epochs() == 36
    # Starting at the floor: the first epoch, then 5 without improvement.
    assert minimum_epochs(lr=1e-3) == 6


def test_linear_in_k() -> None:
    assert linear_in_k(1, 2.0, 3, 4.0, 0) == pytest.approx(1.0)
    assert linear_in_k(1, 2.0, 3, 4.0, 9) == pytest.approx(10.0)
    # A cost measured lower at the later task is flat; a line below zero is clipped at zero.
    assert linear_in_k(1, 4.0, 3, 2.0, 19) == pytest.approx(4.0)
    assert linear_in_k(1, 1.0, 3, 5.0, 0) == 0.0
    with pytest.raises(ValueError, match="k_hi must be above k_lo"):
        linear_in_k(2, 1.0, 2, 1.0, 0)


def test_seconds_per_seed_by_hand() -> None:
    timing = MethodTiming(
        method="spg",
        ks=(1, 2),
        epoch=(2.0, 3.0),  # 1 + k
        validation=0.5,
        end_of_task=(4.0, 6.0),  # 2 + 2k
        importance_pass=(3.0, 5.0),
        evaluation=1.0,
        checkpoint=(0.25, 0.25),
        overhead=0.1,
    )
    # 3 tasks, 2 epochs: per task 0.1 + 2 * (1 + k + 0.5) + (2 + 2k) + 1, checkpoints after
    # tasks 0 and 1.
    expected = sum(0.1 + 2 * (1 + k + 0.5) + (2 + 2 * k) + 1 for k in range(3)) + 2 * 0.25
    assert seconds_per_seed(timing, 3, 2) == pytest.approx(expected)
    joint = MethodTiming(
        method="joint",
        ks=(0, 0),
        epoch=(30.0, 30.0),
        validation=3.0,
        end_of_task=(0.5, 0.5),
        importance_pass=None,
        evaluation=2.0,
        checkpoint=(0.0, 0.0),
        overhead=0.2,
    )
    assert seconds_per_seed(joint, 3, 2) == pytest.approx(0.2 + 2 * 33.0 + 0.5 + 2.0)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        seconds_per_seed(timing, 3, 0)


# ---------------------------------------------------------------------------- run
def _fake_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        (folder / name).write_bytes(b"")
    return root


def test_run_refuses_without_cifar100(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["run", "--data-root", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"CIFAR-100 is not in --data-root {tmp_path}" in err
    assert str(tmp_path / "cifar-100-python" / "train") in err


def test_run_refuses_without_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = _fake_cifar100(tmp_path)
    assert main(["run", "--data-root", str(root), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "no GPU" in captured.err and "--allow-cpu" in captured.err
    assert "python -m benchmarks" not in captured.out
    assert main(["run", "--data-root", str(root), "--dry-run", "--allow-cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--device cpu" in line for line in lines)


def test_run_commands_parse_with_the_suites_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    root = _fake_cifar100(tmp_path)
    assert main(["run", "--data-root", str(root), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "python -m benchmarks " + shlex.join(argv) for argv in run_commands(root, "cuda")
    ]
    for line, benchmark in zip(printed, ("c10", "c20")):
        argv = shlex.split(re.sub(r"^python -m benchmarks ", "", line))
        args = build_parser().parse_args(argv)
        assert args.benchmark == benchmark
        assert args.protocol == "paper"
        assert args.methods == list(PAPER_METHODS) and "packnet" not in args.methods
        assert args.seeds == [0, 1, 2]
        assert args.data_root == root and args.no_download
        assert args.device == "cuda"
        assert args.out == Path(f"benchmarks/results/paper-{benchmark}")
        settings = resolve_settings(args)
        assert settings["backbone"] == "AlexNet-like (2048 hidden, paper dropout)"
        assert settings["validation_fraction"] == 0.1 and settings["batch_size"] == 64
