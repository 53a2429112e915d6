"""Argument handling of ``python -m benchmarks``: every option documented, clear errors that
list the valid names, hyperparameter overrides, the run directory's settings guard."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from benchmarks.catalog import BENCHMARKS
from benchmarks.cli import build_parser, main, resolve_settings, settings_hash
from benchmarks.methods import METHODS, method_hparams, parse_hparams, parse_methods


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_help_documents_every_option_benchmark_and_method(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help"
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
    for name in BENCHMARKS:
        assert name in text
    for name in METHODS:
        assert name in text
    assert "python -m benchmarks report RUN_DIR" in text


def test_unknown_benchmark_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["--benchmark", "split-imagenet"], capsys)
    assert "unknown benchmark 'split-imagenet'" in err
    assert ", ".join(BENCHMARKS) in err


def test_unknown_method_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(["--methods", "naive,icarl"], capsys)
    assert "unknown method(s) icarl" in err
    assert ", ".join(METHODS) in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "positive integer"),
        (["--lr", "-1"], "positive number"),
        (["--train-fraction", "1.5"], "fraction"),
        (["--protocol", "slow"], "invalid choice"),
        (["--hparam", "ewc.lambda=3"], "ewc has no hyperparameter 'lambda'"),
        (["--hparam", "foo.x=1"], "unknown method 'foo'"),
        (["--hparam", "ewc_lambda=3"], "METHOD.NAME=VALUE"),
        (["--backbone", "vgg"], "invalid choice"),
        (["--backbone", "alexnet"], "needs images of at least 12x12"),
        (["--scenario", "class", "--backbone", "resnet"], "task scenario"),
        (["--scenario", "class", "--task-norm-stats"], "task labels at test time"),
        (["--optimizer", "adam"], "--optimizer adam needs an explicit --lr"),
        (["--optimizer", "rmsprop"], "invalid choice"),
        (["--hparam", "spg.mask=bogus"], "mask must be 'grad' or 'update', got 'bogus'"),
        (["--hparam", "spg+lwf.head_rule=1"], "head_rule must be 'mean' or 'none', got 1"),
        (["--hparam", "spg.importance_batch_size=0"], "importance_batch_size"),
        (["--hparam", "ewc.ewc_lambda=-5"], "ewc_lambda must be a number >= 0, got -5"),
        (["--hparam", "replay.mem_size=2.5"], "mem_size must be an int >= 1, got 2.5"),
        (["--hparam", "mas.alpha=2"], "alpha must be a number in [0, 1], got 2"),
        (["--hparam", "lwf.temperature=0"], "temperature must be a number > 0, got 0"),
        (["--hparam", "spg.spg_mask=update"], "spg has no hyperparameter 'spg_mask'"),
        (["--seeds", "-1"], "a seed must be in [0, 2**32), got -1"),
        (["--seeds", "x"], "expected an integer seed, got 'x'"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_values_are_rejected(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in _error(argv, capsys)


def test_methods_parsing() -> None:
    assert parse_methods("all") == list(METHODS)
    assert parse_methods(" SPG, naive,spg ") == ["spg", "naive"]
    assert parse_methods("spg+replay") == ["spg+replay"]
    with pytest.raises(ValueError, match="valid: naive"):
        parse_methods("")


def test_hparam_overrides_reach_the_method() -> None:
    overrides = parse_hparams(["ewc.ewc_lambda=5", "spg.mask='update'", "replay.mem_size=7"])
    assert method_hparams("ewc", "split-fmnist", overrides) == {"ewc_lambda": 5}
    assert method_hparams("spg", "split-fmnist", overrides) == {"mask": "update"}
    assert method_hparams("replay", "split-fmnist", overrides) == {"mem_size": 7}
    assert method_hparams("replay", "split-digits") == {"mem_size": 100}
    assert method_hparams("replay", "perm-fmnist") == {"mem_size": 500}
    assert method_hparams("ewc", "split-digits") == {"ewc_lambda": 100.0}
    assert method_hparams("ewc", "split-fmnist") == {"ewc_lambda": 10000.0}
    assert method_hparams("ewc", "perm-fmnist") == {"ewc_lambda": 100.0}


def test_paper_protocol_uses_its_own_strengths_and_overrides_still_win() -> None:
    assert method_hparams("si", "split-fmnist", protocol="paper") == {
        "si_lambda": 10.0,
        "eps": 0.001,
    }
    assert method_hparams("mas", "split-fmnist", protocol="paper")["lambda_reg"] == 0.1
    # The quick protocol keeps its strengths; a stream without a paper entry keeps the quick ones.
    assert method_hparams("si", "split-fmnist")["si_lambda"] == 100.0
    assert method_hparams("si", "split-mnist", protocol="paper")["si_lambda"] == 100.0
    overrides = parse_hparams(["mas.lambda_reg=3"])
    assert method_hparams("mas", "split-fmnist", overrides, protocol="paper")["lambda_reg"] == 3
    # Methods without a regularisation strength are untouched.
    assert method_hparams("lwf", "split-fmnist", protocol="paper") == {
        "alpha": 1.0,
        "temperature": 2.0,
    }


def test_settings_change_the_default_run_directory() -> None:
    parser = build_parser()
    base = resolve_settings(parser.parse_args([]))
    assert base["epochs"] == 10 and base["batch_size"] == 32  # digits defaults
    assert base["backbone"] == "MLP 64-64-64"
    other = resolve_settings(parser.parse_args(["--epochs", "3"]))
    assert settings_hash(base) != settings_hash(other)
    # Methods, seeds and execution options are not settings: they share a directory.
    same = resolve_settings(parser.parse_args(["--methods", "spg", "--seeds", "4", "--no-plots"]))
    assert settings_hash(base) == settings_hash(same)
    paper = resolve_settings(parser.parse_args(["--benchmark", "c10", "--protocol", "paper"]))
    assert paper["epochs"] == 500 and paper["lr"] == 0.25 and paper["validation_fraction"] == 0.1
    fmnist = resolve_settings(parser.parse_args(["--benchmark", "split-fmnist"]))
    assert fmnist["epochs"] == 5 and fmnist["batch_size"] == 64
    assert fmnist["backbone"] == "MLP 784-256-256"


def test_packnet_needs_fixed_epochs_beyond_its_fine_tuning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "run")]
    assert "needs --epochs >= 2" in _error(["--methods", "packnet", "--epochs", "1", *out], capsys)
    assert "--protocol quick" in _error(
        ["--methods", "packnet", "--protocol", "paper", *out], capsys
    )
    assert not (tmp_path / "run").exists()


def test_report_on_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "not a benchmark run directory" in capsys.readouterr().err


def test_backbone_is_a_setting_and_auto_keeps_the_committed_settings() -> None:
    parser = build_parser()
    paper = resolve_settings(
        parser.parse_args(["--benchmark", "perm-fmnist", "--protocol", "paper"])
    )
    mlp = resolve_settings(
        parser.parse_args(
            ["--benchmark", "perm-fmnist", "--protocol", "paper", "--backbone", "mlp"]
        )
    )
    assert paper["backbone"].startswith("AlexNet-like") and mlp["backbone"] == "MLP 784-256-256"
    assert settings_hash(paper) != settings_hash(mlp)
    assert "task_norm_stats" not in paper
    per_task = resolve_settings(
        parser.parse_args(
            ["--benchmark", "perm-fmnist", "--protocol", "paper", "--task-norm-stats"]
        )
    )
    assert per_task["task_norm_stats"] is True and settings_hash(per_task) != settings_hash(paper)
    # Every committed run directory is reproduced by its own command, unchanged (auto backbone).
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    configs = sorted([*root.glob("*/config.json"), *root.glob("calibration/*/config.json")])
    assert configs
    for path in configs:
        config = json.loads(path.read_text())
        for command in config["commands"]:
            argv = shlex.split(command)[3:]  # after "python -m benchmarks"
            assert resolve_settings(parser.parse_args(argv)) == config["settings"], (path, command)


@pytest.mark.parametrize(
    "bad",
    [["--hparam", "spg.mask=bogus"], ["--seeds", "-3"], ["--device", "nonsense"]],
)
def test_a_bad_value_writes_nothing_and_the_corrected_command_runs(
    tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["--methods", "naive", "--epochs", "1", "--max-train-per-task", "20", "--no-plots"]
    _error([*base, *bad, "--out", str(out)], capsys)
    assert not out.exists()
    assert main([*base, "--quiet", "--out", str(out)]) == 0
    assert (out / "runs" / "naive" / "seed0" / "result.json").is_file()


def test_a_directory_without_any_started_run_takes_new_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"settings": {"epochs": 99}, "methods": []}))
    base = ["--methods", "naive", "--epochs", "1", "--max-train-per-task", "20", "--no-plots"]
    assert main([*base, "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["settings"]["epochs"] == 1
    # ... but once a run has finished, other settings are refused as before.
    with pytest.raises(SystemExit, match="other settings"):
        main([*base, "--epochs", "2", "--quiet", "--out", str(out)])


def test_duplicate_seeds_run_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--methods", "naive", "--epochs", "1", "--max-train-per-task", "20", "--no-plots"]
    assert main([*argv, "--seeds", "3", "3", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "1 run(s) to do" in capsys.readouterr().out


def test_optimizer_is_a_setting_only_when_not_sgd() -> None:
    import torch

    from benchmarks.runner import _make_optimizer

    parser = build_parser()
    sgd = resolve_settings(parser.parse_args([]))
    adam = resolve_settings(parser.parse_args(["--optimizer", "adam", "--lr", "0.001"]))
    assert "optimizer" not in sgd and adam["optimizer"] == "adam" and adam["lr"] == 0.001
    model = torch.nn.Linear(2, 2)
    plain = _make_optimizer("sgd", model, 0.1)
    assert type(plain) is torch.optim.SGD
    assert plain.param_groups[0]["momentum"] == 0 and plain.param_groups[0]["weight_decay"] == 0
    assert type(_make_optimizer("adam", model, 0.001)) is torch.optim.Adam
