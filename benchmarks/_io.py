"""Small file helpers shared by the runner and the report (no heavy imports)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json", "run_paths"]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename), so a killed process never
    leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """Parse a JSON file."""
    with open(path) as fh:
        return json.load(fh)


def run_paths(out: Path, method: str, seed: int) -> dict[str, Path]:
    """The files of run (``method``, ``seed``) inside run directory ``out``."""
    folder = out / "runs" / method.replace("+", "_") / f"seed{seed}"
    return {
        "dir": folder,
        "result": folder / "result.json",
        "progress": folder / "progress.json",
        "checkpoint": folder / "checkpoint.pkl",
    }
