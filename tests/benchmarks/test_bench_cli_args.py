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
        (["--backbone", "alexnet"], "needs images of at least 10x10"),
        (["--scenario", "class", "--backbone", "resnet"], "task scenario"),
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
    overrides = parse_hparams(["ewc.ewc_lambda=5", "spg.spg_mask='update'", "replay.mem_size=7"])
    assert method_hparams("ewc", "split-fmnist", overrides) == {"ewc_lambda": 5}
    assert method_hparams("spg", "split-fmnist", overrides) == {"spg_mask": "update"}
    assert method_hparams("replay", "split-fmnist", overrides) == {"mem_size": 7}
    assert method_hparams("replay", "split-digits") == {"mem_size": 100}
    assert method_hparams("replay", "perm-fmnist") == {"mem_size": 500}
    assert method_hparams("ewc", "split-digits") == {"ewc_lambda": 100.0}
    assert method_hparams("ewc", "split-fmnist") == {"ewc_lambda": 10000.0}
    assert method_hparams("ewc", "perm-fmnist") == {"ewc_lambda": 100.0}


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
    # Every committed run directory is reproduced by its own command, unchanged (auto backbone).
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    configs = sorted(root.glob("*/config.json"))
    assert configs
    for path in configs:
        config = json.loads(path.read_text())
        argv = shlex.split(config["commands"][0])[3:]  # after "python -m benchmarks"
        assert resolve_settings(parser.parse_args(argv)) == config["settings"], path
