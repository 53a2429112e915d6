"""Data-parallel training (``torchrun`` / DistributedDataParallel) of Avalanche strategies with SPG.

Avalanche 0.6.0 provides the building blocks — ``DistributedHelper.init_distributed`` (process
group, same seeds on every rank), ``DistributedHelper.wrap_model`` (DDP with
``find_unused_parameters=True``), a ``DistributedSampler`` inside its train *and* eval data
loaders, loggers that refuse to exist outside rank 0 — but its strategies never wrap the model
themselves, and two gaps remain that break a task-incremental run:

* **Heads created after wrapping are never synchronised.** DDP registers the parameters that
  exist when it is built. ``MultiHeadClassifier`` adds a head per new task during model
  adaptation, so the new heads' gradients stay local and the heads drift apart across ranks
  (the feature extractor stays in sync). The same happens to a model restored from a checkpoint
  or grown by an ``IncrementalClassifier``. :class:`DistributedSupportPlugin` re-wraps the model
  whenever its trainable parameters changed; re-wrapping also broadcasts rank 0's values.
* **Evaluation sees only a shard of the test set.** The eval loader shards the stream across
  ranks (and pads it with repeated samples) and 0.6.0's metrics are not reduced, so rank 0
  reports the accuracy of half the test set. :class:`DistributedSupportPlugin` gives every rank
  the whole experience to evaluate, so metrics are exact and identical on every rank.

Typical script (run it with ``torchrun --nproc_per_node=N script.py`` or plain ``python``)::

    setup = init_distributed(seed=0)              # gloo on CPU, nccl on GPU, no-op single process
    model = DistributedHelper.wrap_model(make_model().to(setup.device))
    strategy = Naive(model=model, ..., device=setup.device,
                     train_mb_size=global_batch // setup.world_size,
                     plugins=[SPGPlugin(importance_batch_size=global_batch),
                              DistributedSupportPlugin()],
                     evaluator=EvaluationPlugin(..., loggers=loggers if setup.is_main else []))
    ...
    cleanup_distributed()

Single node only: Avalanche 0.6.0 picks the GPU by global rank (``cuda:<rank>``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from torch import nn

from avalanche_spg.process_group import unwrap_model

T = TypeVar("T")

__all__ = [
    "DistributedSetup",
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
    "per_rank_batch_size",
    "parameter_digests",
    "check_parameters_synchronized",
    "unwrapped_model",
    "main_process_first",
    "broadcast_from_main",
    "add_distributed_support",
    "DistributedSupportPlugin",
    "ParameterSyncCheckPlugin",
]


@dataclass(frozen=True)
class DistributedSetup:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single-process run): the process that writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is running."""
        return self.world_size > 1


def launched_distributed() -> bool:
    """True when a launcher (``torchrun``) started this process as one of several."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (with any world size)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, and always when not distributed."""
    return not is_distributed() or dist.get_rank() == 0


def init_distributed(
    seed: int, *, use_cuda: bool | None = None, backend: str | None = None
) -> DistributedSetup:
    """Start the process group when launched by ``torchrun``; otherwise set up a single process.

    Under a launcher this calls Avalanche's ``DistributedHelper.init_distributed``: ``env://``
    initialisation from the variables ``torchrun`` sets, backend ``nccl`` when CUDA is used and
    ``gloo`` otherwise, the same seed on every rank (Avalanche's RNG manager: torch, numpy,
    random), and ``cuda:<rank>`` as the current device. Without a launcher it only seeds and
    picks ``cuda`` or ``cpu``. Calling it again in an initialised process is allowed.

    :param seed: the random seed of every rank (the same everywhere, so models start equal):
        an int in ``[0, 2**32)`` (NumPy's range).
    :param use_cuda: use the GPU (default: when one is available).
    :param backend: force a backend (``"gloo"``, ``"nccl"``); default as above.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if launched_distributed() or is_distributed():
        if not is_distributed():
            DistributedHelper.init_distributed(random_seed=seed, backend=backend, use_cuda=use_cuda)
        device = DistributedHelper.make_device()
        return DistributedSetup(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            device=device,
            backend=dist.get_backend(),
        )
    DistributedHelper.set_random_seeds(seed)
    device = torch.device("cuda" if use_cuda and torch.cuda.is_available() else "cpu")
    return DistributedSetup(rank=0, world_size=1, device=device, backend=None)


def cleanup_distributed() -> None:
    """Wait for every rank, then destroy the process group (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    """The minibatch of each rank so that one DDP step averages ``global_batch_size`` samples.

    :raises ValueError: when the global batch does not split evenly across the ranks, or either
        is not a positive int.
    """
    for name, value in (("global batch size", global_batch_size), ("world size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"the {name} must be an int, got {value!r}")
    if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number "
            f"of processes {world_size}"
        )
    return global_batch_size // world_size


# ------------------------------------------------------------------ consistency checks
def parameter_digests(model: nn.Module, include_buffers: bool = True) -> dict[str, str]:
    """A SHA-256 digest of every parameter (and buffer) of the unwrapped ``model``, by name."""
    from avalanche.distributed.distributed_consistency_verification import hash_tensor

    module = unwrap_model(model)
    tensors: list[tuple[str, torch.Tensor]] = list(module.named_parameters())
    if include_buffers:
        tensors += list(module.named_buffers())
    return {name: hash_tensor(t.detach().cpu()) for name, t in tensors}


def check_parameters_synchronized(model: nn.Module, include_buffers: bool = True) -> None:
    """Raise if any parameter (or buffer) of ``model`` differs, bit for bit, across ranks.

    Names are those of the unwrapped model. A no-op in a single process. Every rank must call it
    (it is a collective operation).

    :raises RuntimeError: naming the tensors that differ (or that only some ranks have).
    """
    if not is_distributed() or dist.get_world_size() < 2:
        return
    mine = parameter_digests(model, include_buffers)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    names = sorted(set().union(*(g.keys() for g in gathered)))
    differing = [n for n in names if len({g.get(n) for g in gathered}) != 1]
    if differing:
        raise RuntimeError(
            f"parameters differ across ranks (rank {dist.get_rank()} sees "
            f"{len(differing)} of {len(names)}): {differing[:10]}"
        )


@contextmanager
def unwrapped_model(strategy: Any) -> Iterator[None]:
    """Temporarily put the plain module in ``strategy.model`` (e.g. around a checkpoint save).

    A checkpoint that pickles a ``DistributedDataParallel`` object can only be loaded where a
    process group exists; one saved inside this context loads in a single process too, and
    :class:`DistributedSupportPlugin` wraps the model again at the next experience.
    """
    wrapped = strategy.model
    strategy.model = unwrap_model(wrapped)
    try:
        yield
    finally:
        strategy.model = wrapped


def main_process_first() -> Any:
    """A context in which rank 0 runs first and the other ranks wait (e.g. unpacking a dataset).

    Avalanche's ``DistributedHelper.main_process_first()``; a plain context in one process.
    """
    return DistributedHelper.main_process_first()


def broadcast_from_main(obj: T) -> T:
    """Rank 0's value of ``obj`` on every rank (picklable objects; ``obj`` itself when alone).

    Use it for decisions that read files only rank 0 writes (is there a checkpoint, which runs
    are left), so that every rank takes the same branch.
    """
    if not is_distributed():
        return obj
    return DistributedHelper.broadcast_object(obj)


def add_distributed_support(strategy: Any, full_eval: bool = True) -> DistributedSupportPlugin:
    """The strategy's :class:`DistributedSupportPlugin`, appended to ``strategy.plugins`` if absent.

    Call it after ``maybe_load_checkpoint``: a checkpoint replaces ``strategy.plugins`` with the
    list it was saved with, which lacks the plugin if a run without it wrote the checkpoint.

    :raises ValueError: if the strategy's plugin has another ``full_eval`` than asked for.
    """
    for plugin in strategy.plugins:
        if isinstance(plugin, DistributedSupportPlugin):
            if plugin.full_eval != full_eval:
                raise ValueError(
                    f"the strategy's DistributedSupportPlugin has full_eval={plugin.full_eval!r}, "
                    f"not the full_eval={full_eval!r} asked for"
                )
            return plugin
    plugin = DistributedSupportPlugin(full_eval=full_eval)
    strategy.plugins.append(plugin)
    return plugin


# ------------------------------------------------------------------ plugins
def _trainable_signature(module: nn.Module) -> tuple[tuple[str, int], ...]:
    return tuple((n, id(p)) for n, p in module.named_parameters() if p.requires_grad)


class DistributedSupportPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Make an Avalanche 0.6.0 strategy train and evaluate correctly under DDP.

    A no-op unless a torch.distributed process group with several processes is running, so it
    can stay in the plugin list of single-process runs (and of their checkpoints).

    * ``before_training_exp`` (after Avalanche's model adaptation and optimizer update): wrap
      ``strategy.model`` with Avalanche's ``DistributedHelper.wrap_model`` if it is not wrapped
      yet, and wrap it again whenever its trainable parameters changed since the last wrap (a
      new task head, a grown classifier, a model restored from a checkpoint). DDP only averages
      the gradients of the parameters it saw when built; building it also broadcasts rank 0's
      parameters, so a head initialised differently on another rank is aligned too. The
      parameters themselves are not replaced, so the optimizer and SPG's masks stay valid.
    * ``before_eval_exp`` (if ``full_eval``): replace the eval loader, which Avalanche shards
      across ranks, by one over the whole experience. Every rank then computes the metrics of
      the whole test stream (identical everywhere; rank 0 writes them). The price is that
      evaluation is not sped up by the extra processes.

    :param full_eval: evaluate the whole stream on every rank (default). ``False`` keeps
        Avalanche's sharded evaluation (each rank's metrics cover only its shard).
    """

    def __init__(self, full_eval: bool = True) -> None:
        super().__init__()
        if not isinstance(full_eval, bool):
            raise ValueError(f"full_eval must be True or False, got {full_eval!r}")
        self.full_eval = full_eval
        self._wrapped_model_id: int | None = None
        self._wrapped_signature: tuple[tuple[str, int], ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        # Object ids mean nothing after a checkpoint is loaded: forget them so that the
        # restored model is wrapped again.
        state = self.__dict__.copy()
        state["_wrapped_model_id"] = None
        state["_wrapped_signature"] = ()
        return state

    @staticmethod
    def _active() -> bool:
        return is_distributed() and dist.get_world_size() > 1

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Wrap (or re-wrap) the model in DDP when its trainable parameters changed."""
        if not self._active():
            return
        module = unwrap_model(strategy.model)
        signature = _trainable_signature(module)
        if (
            isinstance(strategy.model, nn.parallel.DistributedDataParallel)
            and id(strategy.model) == self._wrapped_model_id
            and signature == self._wrapped_signature
        ):
            return
        strategy.model = DistributedHelper.wrap_model(module)
        self._wrapped_model_id = id(strategy.model)
        self._wrapped_signature = signature

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Evaluate the whole experience on every rank instead of this rank's shard."""
        if not (self.full_eval and self._active()):
            return
        from avalanche.benchmarks.utils.data_loader import (
            MultiDatasetDataLoader,
            SingleDatasetDataLoader,
        )

        loader = strategy.dataloader
        if not isinstance(loader, MultiDatasetDataLoader) or not loader.distributed_sampling:
            return
        loader_kwargs = dict(loader.loader_kwargs)
        if loader.ffcv_args:
            loader_kwargs["ffcv_args"] = loader.ffcv_args
        strategy.dataloader = SingleDatasetDataLoader(
            strategy.adapted_dataset,
            strategy.eval_mb_size,
            distributed_sampling=False,
            **loader_kwargs,
        )


class ParameterSyncCheckPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Raise as soon as the model's parameters differ across ranks (a debugging aid).

    Calls :func:`check_parameters_synchronized` after every optimizer step
    (``every="update"``; one collective per step, for tests and debugging) or at the end of every
    training experience (``every="experience"``; cheap enough for real runs).

    :param every: ``"update"`` or ``"experience"``.
    """

    def __init__(self, every: str = "experience") -> None:
        super().__init__()
        if every not in ("update", "experience"):
            raise ValueError(f"every must be 'update' or 'experience', got {every!r}")
        self.every = every
        #: Number of checks that passed.
        self.checks = 0

    def after_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Check after each optimizer step (``every="update"``)."""
        if self.every == "update":
            check_parameters_synchronized(strategy.model)
            self.checks += 1

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Check at the end of each training experience (``every="experience"``)."""
        if self.every == "experience":
            check_parameters_synchronized(strategy.model)
            self.checks += 1
