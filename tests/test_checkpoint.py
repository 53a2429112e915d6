"""Pause and resume: ``avalanche_spg.checkpoint`` makes Avalanche's checkpoints
work with current torch and dill, and a run interrupted after experience 2 of 4 and resumed in a
new process is identical to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import checkpoint_protocol, make_mlp, make_naive

from avalanche_spg import SPGPlugin
from avalanche_spg.checkpoint import find_plugin, maybe_load_checkpoint, save_checkpoint

TESTS_DIR = Path(__file__).resolve().parent

# The resumed half runs in a new Python process: the checkpoint file is all it shares with us.
RESUME_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from helpers import checkpoint_protocol
torch.save(checkpoint_protocol(sys.argv[2], stop=4), sys.argv[3])
"""


def test_resume_in_a_new_process_is_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pkl"
    part = checkpoint_protocol(str(ckpt), stop=2)  # "killed" after experience 2 of 4
    assert ckpt.exists()
    resumed_out = tmp_path / "resumed.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(
        [sys.executable, "-c", RESUME_SCRIPT, str(TESTS_DIR), str(ckpt), str(resumed_out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    full = checkpoint_protocol(None, stop=4)  # uninterrupted, meanwhile, in this process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode(errors="replace")[-4000:]
    resumed = torch.load(resumed_out, weights_only=False)

    assert part["start"] == 0 and resumed["start"] == 2 and full["start"] == 0
    assert part["seen_tasks"] == [0, 1]
    assert set(resumed["params"]) == set(full["params"])
    for name, value in full["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    assert set(resumed["importance"]) == set(full["importance"]) != set()
    for name, value in full["importance"].items():
        assert torch.equal(resumed["importance"][name], value), name
    assert resumed["head_scale"] == full["head_scale"]
    assert resumed["seen_tasks"] == full["seen_tasks"] == [0, 1, 2, 3]
    assert resumed["results"] == full["results"]
    assert any(k.startswith("StreamForgetting") for k in full["results"])
    assert resumed["history"] == full["history"]
    # the interrupted run really stopped earlier: its state differs from the final one
    name = "features.1.weight"
    assert not torch.equal(part["params"][name], full["params"][name])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


# --------------------------------------------------------------------- in-process checks
@pytest.fixture()
def trained_strategy(digits_til_small: Any) -> tuple[Any, SPGPlugin]:
    model = make_mlp()
    plugin = SPGPlugin()
    strategy = make_naive(model, [plugin])
    strategy.train(digits_til_small.train_stream[0])
    return strategy, plugin


def test_avalanche_save_checkpoint_fails_without_the_fix(
    trained_strategy: Any, tmp_path: Path
) -> None:
    """Why ``avalanche_spg.checkpoint`` exists: with torch >= 2 and dill 0.4, Avalanche's own
    ``save_checkpoint`` cannot pickle the optimizer class (avalanche issues 1549, 1680)."""
    import dill
    from avalanche.checkpointing import save_checkpoint as avalanche_save_checkpoint

    if not dill.__version__.startswith("0.4") or hasattr(torch.optim, "sgd"):
        pytest.skip(f"the failure is specific to dill 0.4 with torch 2 (dill {dill.__version__})")
    strategy, _ = trained_strategy
    with pytest.raises(Exception, match="(?i)pickl"):
        avalanche_save_checkpoint(strategy, str(tmp_path / "avalanche.pkl"))
    save_checkpoint(strategy, tmp_path / "ours.pkl")
    assert (tmp_path / "ours.pkl").stat().st_size > 0


def test_save_checkpoint_leaves_torch_optim_unchanged(
    trained_strategy: Any, tmp_path: Path
) -> None:
    before = set(vars(torch.optim))
    strategy, _ = trained_strategy
    save_checkpoint(strategy, tmp_path / "sub" / "ckpt.pkl")
    assert set(vars(torch.optim)) == before
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ckpt.pkl"]


def test_find_plugin_returns_the_live_plugin_after_loading(
    trained_strategy: Any, tmp_path: Path, digits_til_small: Any
) -> None:
    strategy, plugin = trained_strategy
    ckpt = tmp_path / "ckpt.pkl"
    save_checkpoint(strategy, ckpt)

    fresh_plugin = SPGPlugin()
    fresh = make_naive(make_mlp(seed=9), [fresh_plugin])
    loaded, next_exp = maybe_load_checkpoint(fresh, ckpt)
    assert next_exp == 1
    live = find_plugin(loaded, SPGPlugin)
    assert any(live is p for p in loaded.plugins)
    assert live is not fresh_plugin and fresh_plugin.importance == {}  # the held one is stale
    assert set(live.importance) == set(plugin.importance)
    for name, value in plugin.importance.items():
        assert torch.equal(live.importance[name], value)
    # the live plugin keeps working
    loaded.train(digits_til_small.train_stream[1])
    assert live.seen_tasks == [0, 1]
    with pytest.raises(LookupError):
        find_plugin(loaded, torch.nn.Linear)


def test_maybe_load_checkpoint_without_a_file_starts_at_zero(tmp_path: Path) -> None:
    strategy = make_naive(make_mlp(), [SPGPlugin()])
    same, start = maybe_load_checkpoint(strategy, tmp_path / "missing.pkl")
    assert same is strategy and start == 0


# ------------------------------------------------------------- files that are not checkpoints
def _truncated(path: Path, trained: Any) -> None:
    save_checkpoint(trained, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path: Path, trained: Any) -> None:
    path.write_text("results: accuracy 0.9\n")


def _empty(path: Path, trained: Any) -> None:
    path.write_bytes(b"")


def _other_torch_file(path: Path, trained: Any) -> None:
    torch.save({"model": trained.model.state_dict()}, path)


@pytest.mark.parametrize(
    "write,problem",
    [
        (_truncated, "truncated"),
        (_text, "not a checkpoint"),
        (_empty, "empty"),
        (_other_torch_file, "not a checkpoint"),
    ],
    ids=["truncated", "text", "empty", "other-torch-file"],
)
def test_a_file_that_is_not_a_checkpoint_gives_an_error_naming_file_and_problem(
    trained_strategy: Any, tmp_path: Path, write: Any, problem: str
) -> None:
    trained, _ = trained_strategy
    ckpt = tmp_path / "run" / "ckpt.pkl"
    ckpt.parent.mkdir()
    write(ckpt, trained)
    strategy = make_naive(make_mlp(seed=3), [SPGPlugin()])
    attributes = dict(vars(strategy))
    with pytest.raises(ValueError, match=problem) as info:
        maybe_load_checkpoint(strategy, ckpt)
    assert str(ckpt) in str(info.value)
    # nothing of the strategy was replaced
    assert set(vars(strategy)) == set(attributes)
    assert all(vars(strategy)[k] is v for k, v in attributes.items())


@pytest.mark.parametrize("saved_with_spg", [False, True])
def test_a_checkpoint_with_another_number_of_spg_plugins_is_refused(
    digits_til_small: Any, tmp_path: Path, saved_with_spg: bool
) -> None:
    """A run without SPG wrote the file (a baseline sharing the path, say): resuming the SPG
    run from it used to drop SPG silently, since the strategy takes the checkpoint's plugins.
    The other way round it added SPG. Refused, naming the file, with nothing replaced."""
    saved = make_naive(make_mlp(), [SPGPlugin()] if saved_with_spg else [])
    saved.train(digits_til_small.train_stream[0])
    ckpt = tmp_path / "ckpt.pkl"
    save_checkpoint(saved, ckpt)
    strategy = make_naive(make_mlp(seed=3), [] if saved_with_spg else [SPGPlugin()])
    attributes = dict(vars(strategy))
    with pytest.raises(ValueError, match="SPGPlugin") as info:
        maybe_load_checkpoint(strategy, ckpt)
    assert str(ckpt) in str(info.value)
    assert set(vars(strategy)) == set(attributes)
    assert all(vars(strategy)[k] is v for k, v in attributes.items())
