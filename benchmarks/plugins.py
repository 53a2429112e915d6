"""Plugins of the suite: the paper protocol's schedule, progress bars, tensor minibatches."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

__all__ = ["PlateauEarlyStopping", "ProgressPlugin", "TensorBatches", "TensorDataPlugin"]


class PlateauEarlyStopping(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """The SPG paper's per-task schedule: plateau lr decay, early stop, best-weight restore.

    At the start of every experience the optimizer gets its initial learning rate back and
    loses its state (a fresh optimizer per task). After every epoch the loss on the task's
    validation set (its own head, eval mode) drives ``ReduceLROnPlateau``; once the lr is at
    ``min_lr``, ``stop_patience`` epochs in a row without improvement stop the experience. At
    the end of the experience (``after_training_exp``) the weights of the best validation epoch
    are restored — place this plugin before any plugin that reads the final weights there
    (``SPGPlugin``'s importance pass).

    As in the reference training loop, the weights the experience starts from (new head
    included) are the best so far until an epoch ends with a finite validation loss: an
    experience whose loss is never finite (training blew up to NaN/inf in its first epoch)
    ends with its starting weights, not with non-finite ones that would spoil every later
    task. Its ``history`` entry keeps ``best_epoch`` -1 and ``best_valid_loss`` inf, which
    the reports count as diverged.

    :param validation: per task label, ``(x, y)`` validation tensors.
    :param lr: the learning rate every experience starts from.
    :param factor: lr multiplier on a plateau (1/3 in the paper).
    :param patience: epochs without improvement before the lr is reduced (4).
    :param min_lr: the lr floor (1e-3).
    :param stop_patience: epochs without improvement at the floor before stopping (5).
    :param batch_size: minibatch size of the validation pass.
    :param joint: validate on every task's set at once (the joint upper bound trains a single
        experience made of all tasks).
    """

    def __init__(
        self,
        validation: dict[int, tuple[Tensor, Tensor]],
        lr: float,
        factor: float = 1.0 / 3.0,
        patience: int = 4,
        min_lr: float = 1e-3,
        stop_patience: int = 5,
        batch_size: int = 1024,
        joint: bool = False,
    ) -> None:
        super().__init__()
        if not validation:
            raise ValueError("PlateauEarlyStopping needs a validation set per task")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if lr <= 0 or min_lr <= 0:
            raise ValueError(f"lr and min_lr must be positive, got {lr} and {min_lr}")
        self.validation = validation
        self.lr = lr
        self.factor = factor
        self.patience = patience
        self.min_lr = min_lr
        self.stop_patience = stop_patience
        self.batch_size = batch_size
        self.joint = joint
        #: Epochs trained in each finished experience, and the best validation loss.
        self.history: list[dict[str, Any]] = []
        self._scheduler: Any = None
        self._best_loss = math.inf
        self._best_state: dict[str, Tensor] | None = None
        self._best_epoch = -1
        self._epochs = 0
        self._stale_at_floor = 0

    def __getstate__(self) -> dict[str, Any]:
        # Between experiences only the history matters; the scheduler holds the optimizer.
        state = self.__dict__.copy()
        state["_scheduler"] = None
        state["_best_state"] = None
        return state

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Forget the previous experience's schedule."""
        self._scheduler = None
        self._best_loss = math.inf
        self._best_state = None
        self._best_epoch = -1
        self._epochs = 0
        self._stale_at_floor = 0

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """On the first epoch: reset lr and optimizer state, attach the plateau scheduler.

        Done here rather than in ``before_training_exp`` because other plugins (PackNet) may
        replace the optimizer there.
        """
        if self._scheduler is not None and self._scheduler.optimizer is strategy.optimizer:
            return
        if self._epochs == 0 and self._best_state is None:
            # The fallback "best": the weights this experience starts from (see the class doc).
            self._best_state = copy.deepcopy(strategy.model.state_dict())
        optimizer = strategy.optimizer
        optimizer.state.clear()
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        self._scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=self.factor,
            patience=self.patience,
            min_lr=self.min_lr,
        )

    def after_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Validation loss → lr schedule, best weights, early stop."""
        from avalanche_spg.distributed import broadcast_from_main

        self._epochs += 1
        # Rank 0's loss on every rank: the schedule and the stop must be identical everywhere
        # (a rank that stops alone would leave the others waiting in the next all-reduce).
        loss = broadcast_from_main(self.validation_loss(strategy))
        improved = loss < self._best_loss
        if improved:
            self._best_loss = loss
            self._best_epoch = self._epochs
            self._best_state = copy.deepcopy(strategy.model.state_dict())
        at_floor = all(g["lr"] <= self.min_lr * (1 + 1e-9) for g in strategy.optimizer.param_groups)
        self._scheduler.step(loss)
        if at_floor:
            self._stale_at_floor = 0 if improved else self._stale_at_floor + 1
            if self._stale_at_floor >= self.stop_patience:
                strategy.stop_training()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Restore the best-validation weights (before SPG's importance pass)."""
        if self._best_state is not None:
            strategy.model.load_state_dict(self._best_state)
        self.history.append(
            {
                "epochs": self._epochs,
                "best_epoch": self._best_epoch,
                "best_valid_loss": self._best_loss,
                "final_lr": min(g["lr"] for g in strategy.optimizer.param_groups),
            }
        )
        self._best_state = None
        self._scheduler = None

    @torch.no_grad()
    def validation_loss(self, strategy: Any) -> float:
        """Mean cross-entropy on the current task's validation set (all sets when joint)."""
        from avalanche.models import avalanche_forward

        model = strategy.model
        if self.joint:
            tasks = sorted(self.validation)
        else:
            tasks = [int(t) for t in strategy.experience.task_labels]
        modes = {m: m.training for m in model.modules()}
        model.eval()
        total, count = 0.0, 0
        try:
            for task in tasks:
                x_all, y_all = self.validation[task]
                for start in range(0, len(y_all), self.batch_size):
                    x = x_all[start : start + self.batch_size].to(strategy.device)
                    y = y_all[start : start + self.batch_size].to(strategy.device)
                    labels = torch.full((len(y),), task, dtype=torch.long, device=x.device)
                    out = avalanche_forward(model, x, labels)
                    total += float(nn.functional.cross_entropy(out, y, reduction="sum"))
                    count += len(y)
        finally:
            for module, mode in modes.items():
                module.train(mode)
        return total / max(count, 1)


class ProgressPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """A tqdm bar per experience (the iterations of all its epochs, with the epoch and the
    loss). tqdm shows it only on a terminal; the runner prints one line per finished task."""

    def __init__(self, label: str, n_tasks: int, enabled: bool = True) -> None:
        super().__init__()
        self.label = label
        self.n_tasks = n_tasks
        self.enabled = enabled
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bar"] = None  # a bar is not picklable (checkpoints)
        return state

    def before_training_epoch(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Open the experience's bar on its first epoch."""
        if not self.enabled:
            return
        epochs = strategy.train_epochs
        if self._bar is None:
            from tqdm.auto import tqdm

            task = strategy.clock.train_exp_counter + 1
            self._bar = tqdm(
                total=len(strategy.dataloader) * epochs,
                desc=f"{self.label} task {task}/{self.n_tasks}",
                unit="it",
                leave=False,
                disable=None,
                dynamic_ncols=True,
            )
        self._bar.set_postfix_str(f"epoch {strategy.clock.train_exp_epochs + 1}/{epochs}")

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Advance the bar; show the loss now and then."""
        if self._bar is None or self._bar.disable:
            return
        self._bar.update(1)
        if self._bar.n % 25 == 0:
            self._bar.set_postfix_str(
                f"epoch {strategy.clock.train_exp_epochs + 1}/{strategy.train_epochs} "
                f"loss {float(strategy.loss.detach()):.3f}"
            )

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Close the bar (an early-stopped experience ends before its total)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBatches:
    """Minibatches ``[x, y, task_labels]`` sliced straight from tensors.

    What Avalanche's data loaders yield for the suite's tensor datasets, without the
    per-sample ``__getitem__`` of an ``AvalancheDataset`` (which dominates CPU time on small
    models): shuffled with the global torch RNG (seeded, checkpointed) for training, in
    dataset order for evaluation; the last batch may be smaller.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        task_labels: Tensor,
        batch_size: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y, self.t = x, y, task_labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        # Data-parallel training: every rank uses rank 0's permutation and takes
        # samples rank, rank + world_size, ... of each global minibatch of
        # batch_size * world_size; a last global batch too small to give every rank a sample
        # is dropped (all ranks must run the same number of steps).
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        n = len(self.y)
        if self.world_size > 1 and n % step and n % step < self.world_size:
            return n // step
        return (n + step - 1) // step

    def __iter__(self) -> Any:
        n = len(self.y)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        if self.world_size > 1 and self.shuffle:
            from avalanche_spg.distributed import broadcast_from_main

            # Rank 0's order: the RNG streams of the ranks can drift apart (dropout in a pass
            # over shards of unequal size), and the shards must partition every batch.
            order = broadcast_from_main(order)
        step = self.batch_size * self.world_size
        for start in range(0, n, step):
            if self.world_size == 1 and not self.shuffle:
                idx = slice(start, start + step)
                yield [self.x[idx], self.y[idx], self.t[idx]]
                continue
            chosen = order[start : start + step]
            if self.world_size > 1:
                if len(chosen) < self.world_size:
                    break
                chosen = chosen[self.rank :: self.world_size]
            yield [self.x[chosen], self.y[chosen], self.t[chosen]]


class TensorDataPlugin(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Serve the training and evaluation minibatches from the stream's tensors.

    Replaces ``strategy.dataloader`` after Avalanche has built it (``before_training_exp`` /
    ``before_eval_exp``), with a :class:`TensorBatches` over the same samples: the current
    task's training tensors (all tasks' for joint training) and each test experience's
    tensors. Training batches are left alone when another plugin (replay) has replaced the
    loader. The tensors are not part of checkpoints: call :meth:`attach` after a resume.

    :param train: per task label, ``(x, y)`` training tensors.
    :param test: per task label, ``(x, y)`` test tensors.
    """

    def __init__(
        self,
        train: dict[int, tuple[Tensor, Tensor]],
        test: dict[int, tuple[Tensor, Tensor]],
    ) -> None:
        super().__init__()
        self.attach(train, test)

    def attach(
        self, train: dict[int, tuple[Tensor, Tensor]], test: dict[int, tuple[Tensor, Tensor]]
    ) -> None:
        """(Re)connect the tensors (after loading a checkpoint)."""
        self._train = train
        self._test = test

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_train"] = {}
        state["_test"] = {}
        return state

    @staticmethod
    def _is_default_loader(loader: Any) -> bool:
        from avalanche.benchmarks.utils.data_loader import (
            MultiDatasetDataLoader,
            ReplayDataLoader,
        )
        from torch.utils.data import DataLoader

        if isinstance(loader, ReplayDataLoader):
            return False
        return isinstance(loader, (MultiDatasetDataLoader, DataLoader))

    def _batches(
        self,
        parts: dict[int, tuple[Tensor, Tensor]],
        tasks: list[int],
        size: int,
        shuffle: bool,
        shard: bool = False,
    ) -> TensorBatches:
        import torch.distributed as dist

        xs, ys, ts = [], [], []
        for task in tasks:
            x, y = parts[task]
            xs.append(x)
            ys.append(y)
            ts.append(torch.full((len(y),), task, dtype=torch.long))
        rank, world = 0, 1
        if shard and dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        if len(tasks) == 1:
            return TensorBatches(xs[0], ys[0], ts[0], size, shuffle, rank, world)
        return TensorBatches(
            torch.cat(xs), torch.cat(ys), torch.cat(ts), size, shuffle, rank, world
        )

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Training batches of the experience's tasks (unless replay replaced the loader)."""
        if not self._train or not self._is_default_loader(strategy.dataloader):
            return
        tasks = sorted({int(t) for t in strategy.adapted_dataset.targets_task_labels.uniques})
        expected = sum(len(self._train[t][1]) for t in tasks)
        if expected != len(strategy.adapted_dataset):
            return  # not the plain experience data: keep Avalanche's loader
        strategy.dataloader = self._batches(
            self._train, tasks, strategy.train_mb_size, True, shard=True
        )

    def before_eval_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Evaluation batches of the test experience, in dataset order."""
        if not self._test or not self._is_default_loader(strategy.dataloader):
            return
        tasks = [int(t) for t in strategy.experience.task_labels]
        if len(tasks) != 1 or len(self._test[tasks[0]][1]) != len(strategy.adapted_dataset):
            return
        strategy.dataloader = self._batches(self._test, tasks, strategy.eval_mb_size, False)
