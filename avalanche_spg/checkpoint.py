"""Pause and resume: Avalanche checkpoints that work with current torch and dill.

Avalanche 0.6.0's ``save_checkpoint`` dill-pickles the whole strategy. With torch >= 2 and dill
0.4 it fails (``PicklingError: Can't pickle sentinel``): torch no longer exposes its
``torch.optim.sgd``-style submodules as attributes of ``torch.optim``, so dill pickles the
optimizer class by value and reaches an unpicklable typing object (Avalanche issues 1549 and 1680).
The functions here put those submodule attributes back for the duration of the save, write the
file atomically, and otherwise behave exactly like Avalanche's.

Typical use (one process per run; a killed run resumes after its last finished experience)::

    from avalanche_spg.checkpoint import save_checkpoint, maybe_load_checkpoint

    strategy, start = maybe_load_checkpoint(strategy, "ckpt.pkl")
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
        save_checkpoint(strategy, "ckpt.pkl")

After loading, read plugins from ``strategy.plugins`` (see :func:`find_plugin`): objects held
from before the load are stale copies.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from avalanche_spg.process_group import unwrap_model

__all__ = ["save_checkpoint", "maybe_load_checkpoint", "find_plugin", "optim_submodules_visible"]

T = TypeVar("T")


@contextmanager
def optim_submodules_visible() -> Iterator[None]:
    """Temporarily expose ``torch.optim.<submodule>`` attributes so dill pickles classes by ref."""
    added: list[str] = []
    for module_name, module in list(sys.modules.items()):
        prefix = "torch.optim."
        if module is None or not module_name.startswith(prefix):
            continue
        attr = module_name[len(prefix) :]
        if "." in attr or hasattr(torch.optim, attr):
            continue
        setattr(torch.optim, attr, module)
        added.append(attr)
    try:
        yield
    finally:
        for attr in added:
            delattr(torch.optim, attr)


def save_checkpoint(
    strategy: Any, fname: str | os.PathLike[str], exclude: Collection[str] | None = None
) -> None:
    """Save ``strategy`` (model, optimizer, plugins, evaluator, clock, RNG) to ``fname``.

    Same contract as ``avalanche.checkpointing.save_checkpoint``; call it between experiences,
    never inside training. Only the process with rank 0 writes under ``torch.distributed``. The
    file is written to a temporary name and renamed, so a run killed mid-save keeps the previous
    checkpoint.
    """
    import torch.distributed as dist
    from avalanche.checkpointing import save_checkpoint as avalanche_save

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    target = Path(fname)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(handle)
    # Save the plain module: a pickled DistributedDataParallel only loads where a process group
    # exists, so a checkpoint written under torchrun could not be resumed in one process.
    wrapped = strategy.model
    strategy.model = unwrap_model(wrapped)
    try:
        with optim_submodules_visible():
            avalanche_save(strategy, tmp_name, exclude=exclude)
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    finally:
        strategy.model = wrapped


def maybe_load_checkpoint(
    strategy: T,
    fname: str | os.PathLike[str],
    map_location: Any = None,
    unique_objects: Any = None,
) -> tuple[T, int]:
    """Load ``fname`` into ``strategy`` if it exists; return ``(strategy, next experience index)``.

    Same contract as ``avalanche.checkpointing.maybe_load_checkpoint`` (0 when there is no
    file). Every rank may load the same file. All or nothing: a file that is empty, truncated,
    not a checkpoint, or otherwise unreadable raises ``ValueError`` naming the file and the
    problem, and leaves ``strategy`` as it was. So does a checkpoint saved with another number
    of ``SPGPlugin`` s than ``strategy`` has (a strategy takes the checkpoint's plugins, so
    resuming a run without SPG would silently drop the SPG of ``strategy``, and the other way
    round add it).
    """
    from avalanche.checkpointing import maybe_load_checkpoint as avalanche_load

    if isinstance(fname, (str, os.PathLike)) and not os.path.exists(fname):
        return strategy, 0
    # Avalanche copies the saved strategy's attributes onto the one it is given, then reads
    # the experience counter: given a blank stand-in, nothing of ``strategy`` is touched
    # unless the whole checkpoint could be read.
    loaded = _Attributes()
    try:
        with optim_submodules_visible():
            _, next_experience = avalanche_load(
                loaded, fname, map_location=map_location, unique_objects=unique_objects
            )
    except Exception as error:
        raise ValueError(
            f"cannot load checkpoint {_name(fname)}: {_problem(fname, error)}"
        ) from error
    if isinstance(next_experience, bool) or not isinstance(next_experience, int):
        raise ValueError(
            f"cannot load checkpoint {_name(fname)}: it is not a checkpoint written by "
            f"save_checkpoint (its experience counter is {next_experience!r})"
        )
    _check_same_spg(fname, strategy, loaded)
    strategy.__dict__.update(vars(loaded))
    return strategy, next_experience


def _check_same_spg(fname: Any, strategy: Any, loaded: Any) -> None:
    """``ValueError`` unless the checkpoint holds as many ``SPGPlugin`` s as ``strategy``."""
    from avalanche_spg.plugin import SPGPlugin

    def spg_count(holder: Any) -> int:
        return sum(isinstance(p, SPGPlugin) for p in getattr(holder, "plugins", None) or [])

    here, saved = spg_count(strategy), spg_count(loaded)
    if here != saved:
        effect = "drop this strategy's SPG" if here > saved else "add SPG to this strategy"
        raise ValueError(
            f"cannot load checkpoint {_name(fname)}: it was saved by a strategy with {saved} "
            f"SPGPlugin, this one has {here}, and loading it would silently {effect} (a "
            "strategy takes the checkpoint's plugins). Give each run its own checkpoint file."
        )


class _Attributes:
    """A blank object that receives the attributes of a loaded strategy."""


def _name(fname: Any) -> str:
    return os.fspath(fname) if isinstance(fname, (str, os.PathLike)) else repr(fname)


def _problem(fname: Any, error: Exception) -> str:
    """What is wrong with a checkpoint file that could not be loaded, in words."""
    detail = f"{type(error).__name__}: {error}"
    if isinstance(fname, (str, os.PathLike)) and os.path.isfile(fname):
        if os.path.getsize(fname) == 0:
            return "the file is empty"
        if not _starts_like_a_torch_file(fname):
            return f"it is not a checkpoint (not a file written by torch.save; {detail})"
        if not zipfile.is_zipfile(fname):
            return f"the file is truncated (the end of its archive is missing; {detail})"
    if isinstance(error, (KeyError, AttributeError, TypeError)):
        return f"it is not a checkpoint written by save_checkpoint ({detail})"
    return f"the checkpoint cannot be restored here ({detail})"


def _starts_like_a_torch_file(fname: str | os.PathLike[str]) -> bool:
    """Whether the file begins as ``torch.save`` files do (a zip archive's first entry)."""
    with open(fname, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def find_plugin(strategy: Any, plugin_type: type[T]) -> T:
    """The live plugin of ``plugin_type`` in ``strategy.plugins`` (use this after loading)."""
    for plugin in strategy.plugins:
        if isinstance(plugin, plugin_type):
            return plugin
    raise LookupError(f"strategy has no plugin of type {plugin_type.__name__}")
