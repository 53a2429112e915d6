"""The README's quickstart runs as written (extracted from the README, run in a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    quickstart = _python_blocks()[0]
    assert "SPGPlugin" in quickstart and "strategy.train" in quickstart
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = re.search(r"average accuracy over tasks: ([0-9.]+)", done.stdout)
    bwt = re.search(r"backward transfer: (-?[0-9.]+)", done.stdout)
    assert accuracy and bwt, done.stdout
    # Digits are easy: a working SPG + replay run is far above chance (0.5 per 2-class task).
    assert float(accuracy.group(1)) > 0.8
    assert "head scale:" in done.stdout


def test_readme_has_exactly_two_newcomer_commands() -> None:
    text = README.read_text()
    bash_blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [b for b in bash_blocks if "python3 -m venv" in b]
    assert len(commands) == 2
    assert "python -m benchmarks" in commands[0]
    assert "python -m pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "python -m pytest -q" in commands[1]
