"""SPG under DistributedDataParallel: a real 2-process gloo run on CPU, spawned by the tests.

One run (module fixture) does everything, then the tests read what it recorded:

1. In this process (no process group): a single-process reference run trains experiences 0, 1,
   2 of a digits stream with minibatch 32 and keeps the model and ``SPGPlugin`` state after
   experience 0, and the parameters, importance and accuracies at the end.
2. Two forked processes (``gloo``; ``init_distributed`` reads the same environment variables
   ``torchrun`` sets) load that experience-0 state — the plugin state from the single-process
   run, keys without DDP's ``module.`` prefix — wrap the model with Avalanche's
   ``DistributedHelper.wrap_model`` and train experiences 1 and 2 with minibatch 16 per rank,
   which is the same global minibatch of 32 (no shuffling, no dropout). After every optimizer
   step they compare parameters, masked gradients, importance and head scale across ranks; rank
   0 saves what the single-process checks below need. After experience 1 every rank calls
   ``save_checkpoint`` (only rank 0 may write); after experience 2 every rank resumes from rank
   0's file in a fresh strategy and trains experience 2 again.

A second, smaller run (``class_run``) checks ``SPGPlugin(class_incremental=True)``: its
end-of-experience pass, from the same state on the same model, in this process and on two
forked ranks that each read only their shard of the experience.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from helpers import CallbackProbe, make_digits_benchmark, make_mlp, make_naive, reference_gamma
from torch import Tensor, nn
from torch.utils.data import Dataset

from avalanche_spg import SPGPlugin
from avalanche_spg.checkpoint import find_plugin, maybe_load_checkpoint, save_checkpoint
from avalanche_spg.distributed import (
    DistributedSupportPlugin,
    add_distributed_support,
    broadcast_from_main,
    check_parameters_synchronized,
    cleanup_distributed,
    init_distributed,
    per_rank_batch_size,
    unwrapped_model,
)
from avalanche_spg.plugin import unwrap_model
from avalanche_spg.process_group import world_size

WORLD_SIZE = 2
GLOBAL_BATCH = 32
EPOCHS = 2
LR = 0.1
N_EXPERIENCES = 3
TIMEOUT_S = 240.0


def _benchmark() -> Any:
    # About 250 training samples per experience: 2 ranks x 16 divides the global batch of 32.
    return make_digits_benchmark(5, n_train=1250, n_test=300)


def _evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


def _accuracies(results: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in results.items() if k.startswith("Top1_Acc_Exp")}


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in unwrap_model(model).named_parameters()}


def _train_kwargs() -> dict[str, Any]:
    # No shuffling and whole minibatches only: rank r then sees samples r, r+2, ... of each
    # global minibatch, so a DDP step averages exactly the single-process minibatch.
    return {"shuffle": False, "drop_last": True}


# ------------------------------------------------------------------ worker side
class _RawGrads(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Placed before SPGPlugin: keeps the DDP-averaged gradients before masking."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: dict[str, Tensor] = {}

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.grads = {
            n: p.grad.detach().clone()
            for n, p in unwrap_model(strategy.model).named_parameters()
            if p.grad is not None
        }


def _digest(tensors: dict[str, Tensor]) -> list[tuple[str, list[float]]]:
    # Exact per-tensor fingerprint (float64 sums of the values and of the values weighted by
    # their position) that is cheap to all-gather.
    out = []
    for name in sorted(tensors):
        flat = tensors[name].detach().double().reshape(-1)
        position = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        out.append((name, [float(flat.sum()), float((flat * position).sum())]))
    return out


class _Checker(SupervisedPlugin, supports_distributed=True):  # type: ignore[call-arg]
    """Placed after SPGPlugin: compares everything SPG decides across ranks, at every step."""

    def __init__(self, spg: SPGPlugin, raw: _RawGrads, out_dir: str | None) -> None:
        super().__init__()
        self.spg = spg
        self.raw = raw
        self.out_dir = out_dir  # where rank 0 saves each experience's state (None: nowhere)
        self.failures: list[str] = []
        self.steps = 0
        self.max_mask_error = 0.0
        self.masked_steps = 0
        self._before: dict[str, Any] = {}

    def _same_on_all_ranks(self, what: str, value: Any) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        if any(g != gathered[0] for g in gathered[1:]):
            self.failures.append(f"{what} differs across ranks")

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._before = self.spg.state_dict()
        self._same_on_all_ranks("importance before the experience", _digest(self.spg.importance))
        self._same_on_all_ranks("head scale", self.spg.head_scale)

    def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model = unwrap_model(strategy.model)
        features, heads = self.spg.split_parameters(model)
        importance = self.spg.importance
        masked: dict[str, Tensor] = {}
        for name, param in {**features, **heads}.items():
            if param.grad is None:
                continue
            masked[name] = param.grad
            raw = self.raw.grads[name]
            if name in heads:
                expected = raw * self.spg.head_scale
            elif name in importance:
                expected = raw * (1 - importance[name].to(raw))
            else:
                self.failures.append(f"feature parameter {name} has no importance entry")
                continue
            self.max_mask_error = max(
                self.max_mask_error, float((param.grad - expected).abs().max())
            )
        if importance:
            self.masked_steps += 1
        self._same_on_all_ranks("masked gradients", _digest(masked))
        self._same_on_all_ranks("head scale", self.spg.head_scale)

    def after_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.steps += 1
        try:
            check_parameters_synchronized(strategy.model)
        except RuntimeError as error:
            self.failures.append(f"step {self.steps}: {error}")

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        self._same_on_all_ranks("importance after the experience", _digest(self.spg.importance))
        if dist.get_rank() == 0 and self.out_dir is not None:
            index = strategy.experience.current_experience
            torch.save(
                {
                    "model": copy.deepcopy(unwrap_model(strategy.model)),
                    "before": self._before,
                    "after": self.spg.state_dict(),
                },
                Path(self.out_dir) / f"exp{index}.pt",
            )


def _build_ddp_strategy(model: nn.Module, plugins: list[SupervisedPlugin], rank_batch: int) -> Any:
    from avalanche.distributed import DistributedHelper

    wrapped = DistributedHelper.wrap_model(model)
    return make_naive(
        wrapped,
        [*plugins, DistributedSupportPlugin()],
        lr=LR,
        train_mb_size=rank_batch,
        train_epochs=EPOCHS,
        evaluator=_evaluator(),
    )


def _torchrun_environment(rank: int, port: int) -> None:
    """The variables torchrun sets, which ``init_distributed`` reads."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
    )
    torch.set_num_threads(1)


def _worker_main(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    _torchrun_environment(rank, port)
    out = Path(out_dir)
    result: dict[str, Any] = {"failures": []}
    try:
        setup = init_distributed(seed=0, use_cuda=False)
        result["setup"] = (setup.rank, setup.world_size, setup.backend, str(setup.device))
        rank_batch = per_rank_batch_size(GLOBAL_BATCH, setup.world_size)
        benchmark = _benchmark()

        # (c) Start from the single-process run's state after experience 0.
        start = torch.load(out / "single_exp0.pt", weights_only=False)
        spg = SPGPlugin(importance_batch_size=GLOBAL_BATCH)
        spg.load_state_dict(start["spg"])
        raw = _RawGrads()
        checker = _Checker(spg, raw, out_dir)
        strategy = _build_ddp_strategy(start["model"], [raw, spg, checker], rank_batch)
        result["heads_at_start"] = len(unwrap_model(strategy.model).classifier.classifiers)
        torch.set_rng_state(start["rng"])

        accuracies = []
        for index in range(1, N_EXPERIENCES):
            strategy.train(benchmark.train_stream[index], **_train_kwargs())
            accuracies.append(_accuracies(strategy.eval(benchmark.test_stream[:N_EXPERIENCES])))
            if index == 1:
                # (d) Every rank asks; only rank 0 may write.
                save_checkpoint(strategy, out / f"ckpt_rank{setup.rank}.pkl")
                dist.barrier()
                result["files_after_save"] = sorted(p.name for p in out.glob("ckpt_rank*"))
        result["accuracies"] = accuracies
        result["params"] = _params(strategy.model)
        result["importance"] = spg.importance
        result["importance_keys"] = sorted(spg.importance)
        result["steps"] = checker.steps
        result["masked_steps"] = checker.masked_steps
        result["max_mask_error"] = checker.max_mask_error
        result["failures"] += checker.failures
        result["model_type"] = type(strategy.model).__name__
        with unwrapped_model(strategy):
            save_checkpoint(strategy, out / "portable.pkl")
        dist.barrier()

        # (d) Every rank resumes from rank 0's checkpoint in a fresh strategy.
        fresh_model = make_mlp((32, 32), seed=123)
        fresh = _build_ddp_strategy(fresh_model, [SPGPlugin()], rank_batch)
        fresh, next_index = maybe_load_checkpoint(fresh, out / "ckpt_rank0.pkl")
        resumed_spg = find_plugin(fresh, SPGPlugin)
        resumed_checker = find_plugin(fresh, _Checker)  # the checkpoint's copy
        resumed_checker.failures, resumed_checker.out_dir = [], None
        result["resumed_next_index"] = next_index
        result["resumed_importance"] = resumed_spg.importance
        fresh.train(benchmark.train_stream[2], **_train_kwargs())
        result["resumed_params"] = _params(fresh.model)
        result["failures"] += [f"after resuming: {f}" for f in resumed_checker.failures]
        try:
            check_parameters_synchronized(fresh.model)
        except RuntimeError as error:
            result["failures"].append(f"after resuming: {error}")

        # The cross-rank check does see a difference of one element by 1e-6.
        probe = make_mlp((8,), seed=0)
        if setup.rank == 1:
            with torch.no_grad():
                probe.features[1].bias[0] += 1e-6
        try:
            check_parameters_synchronized(probe)
            result["probe_error"] = ""
        except RuntimeError as error:
            result["probe_error"] = str(error)
        result["broadcast"] = broadcast_from_main(f"from rank {setup.rank}")
        cleanup_distributed()
    except BaseException:
        result["failures"].append(traceback.format_exc())
        raise
    finally:
        torch.save(result, out / f"rank{rank}.pt")


# ------------------------------------------------------------------ the run
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(worker: Callable[[int, str, int], None], out_dir: Path) -> None:
    # fork: the children reuse this process's imports (Avalanche takes seconds to import);
    # they set the same environment variables torchrun sets and initialise through Avalanche.
    context = mp.start_processes(
        worker,
        args=(str(out_dir), _free_port()),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the 2-process run did not finish within {TIMEOUT_S:.0f} s")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ddp")
    benchmark = _benchmark()

    # Single-process reference: global minibatch 32.
    torch.manual_seed(0)
    spg = SPGPlugin(importance_batch_size=GLOBAL_BATCH)
    model = make_mlp((32, 32), seed=0)
    strategy = make_naive(
        model, [spg], lr=LR, train_mb_size=GLOBAL_BATCH, train_epochs=EPOCHS, evaluator=_evaluator()
    )
    strategy.train(benchmark.train_stream[0], **_train_kwargs())
    # The heads of tasks 1 and 2 do not exist yet: Avalanche creates them (training adaptation,
    # evaluation) after DDP was built. The RNG state makes both runs initialise them alike.
    torch.save(
        {"model": copy.deepcopy(model), "spg": spg.state_dict(), "rng": torch.get_rng_state()},
        out / "single_exp0.pt",
    )
    accuracies = []
    for index in range(1, N_EXPERIENCES):
        strategy.train(benchmark.train_stream[index], **_train_kwargs())
        accuracies.append(_accuracies(strategy.eval(benchmark.test_stream[:N_EXPERIENCES])))

    started = time.perf_counter()
    _launch(_worker_main, out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return SimpleNamespace(
        out=out,
        benchmark=benchmark,
        ranks=ranks,
        single_params=_params(model),
        single_importance=spg.importance,
        single_accuracies=accuracies,
        seconds=time.perf_counter() - started,
    )


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in a)


# ------------------------------------------------------------------ tests
def test_run_was_distributed_and_every_check_passed(run: SimpleNamespace) -> None:
    for rank, result in enumerate(run.ranks):
        assert result["failures"] == [], f"rank {rank}: {result['failures']}"
        assert result["setup"] == (rank, WORLD_SIZE, "gloo", "cpu")
        assert result["model_type"] == "DistributedDataParallel"
        # Heads of tasks 1 and 2 were created after the model was wrapped.
        assert result["heads_at_start"] == 1
        assert result["steps"] > 0
        # Masks were active (importance loaded from the single-process run) at every step...
        assert result["masked_steps"] == result["steps"]
        # ...and scaled each DDP-averaged gradient by exactly 1 - A (heads by 1 - mean A).
        assert result["max_mask_error"] <= 1e-7
    assert run.ranks[0]["steps"] == run.ranks[1]["steps"]


def test_importance_is_identical_on_every_rank(run: SimpleNamespace) -> None:
    first, second = run.ranks
    assert first["importance_keys"] == second["importance_keys"]
    for name in first["importance_keys"]:
        assert torch.equal(first["importance"][name], second["importance"][name]), name


def test_sharded_importance_equals_single_process_importance(run: SimpleNamespace) -> None:
    """At each experience: the plugin in one process, over the whole experience and on the very
    model the DDP run ended with, gives the importance the two ranks computed on their halves."""
    for index in range(1, N_EXPERIENCES):
        saved = torch.load(run.out / f"exp{index}.pt", weights_only=False)
        single = SPGPlugin(importance_batch_size=GLOBAL_BATCH)
        single.load_state_dict(saved["before"])
        experience = run.benchmark.train_stream[index]
        fake_strategy = SimpleNamespace(
            model=saved["model"], experience=experience, device="cpu", train_mb_size=16
        )
        single.after_training_exp(fake_strategy)
        distributed = saved["after"]["importance"]
        assert set(single.importance) == set(distributed)
        assert _max_diff(single.importance, distributed) <= 1e-5
        assert saved["after"]["seen_tasks"] == single.seen_tasks

        # And against the test-suite's independent implementation of docs/algorithm.md, section 1.
        gamma = reference_gamma(
            saved["model"],
            experience.dataset.train(),
            saved["before"]["seen_tasks"],
            index,
            GLOBAL_BATCH,
        )
        expected = {n: torch.maximum(saved["before"]["importance"][n], g) for n, g in gamma.items()}
        assert _max_diff(expected, distributed) <= 1e-5


def test_ddp_run_matches_the_single_process_run(run: SimpleNamespace) -> None:
    """Same global minibatch, same data order: gradients, masks, heads and importance agree, so
    the whole trajectory does (a head DDP did not synchronise would drift by ~1e-3)."""
    for result in run.ranks:
        assert _max_diff(result["params"], run.single_params) <= 1e-5
        assert _max_diff(result["importance"], run.single_importance) <= 1e-5


def test_metrics_cover_the_whole_test_stream_on_every_rank(run: SimpleNamespace) -> None:
    first, second = run.ranks
    assert first["accuracies"] == second["accuracies"]
    n_test = min(len(e.dataset) for e in run.benchmark.test_stream[:N_EXPERIENCES])
    for ddp, single in zip(first["accuracies"], run.single_accuracies):
        assert ddp.keys() == single.keys()
        for key in ddp:
            assert abs(ddp[key] - single[key]) <= 1.0 / n_test, key


def test_importance_names_have_no_ddp_prefix_and_round_trip(run: SimpleNamespace) -> None:
    """A single-process plugin state loaded into the DDP run (done by the workers), and the DDP
    run's state loaded back into a single-process plugin and model."""
    saved = torch.load(run.out / f"exp{N_EXPERIENCES - 1}.pt", weights_only=False)
    plain_model = saved["model"]
    assert not isinstance(plain_model, nn.parallel.DistributedDataParallel)
    back = SPGPlugin()
    back.load_state_dict(saved["after"])
    features, _ = back.split_parameters(plain_model)
    assert sorted(features) == run.ranks[0]["importance_keys"]
    assert not any(name.startswith("module.") for name in run.ranks[0]["importance_keys"])
    optimizer = torch.optim.SGD(plain_model.parameters(), lr=1.0)
    strategy = SimpleNamespace(model=plain_model, optimizer=optimizer)
    back.before_training_exp(strategy)
    for param in features.values():
        param.grad = torch.ones_like(param)
    back.before_update(strategy)
    for name, param in features.items():
        assert torch.equal(param.grad, 1 - back.importance[name]), name


def test_only_rank_zero_writes_checkpoints_and_every_rank_resumes(run: SimpleNamespace) -> None:
    for result in run.ranks:
        assert result["files_after_save"] == ["ckpt_rank0.pkl"]
    saved_after_exp1 = torch.load(run.out / "exp1.pt", weights_only=False)["after"]["importance"]
    for result in run.ranks:
        assert result["resumed_next_index"] == 1  # one train() call before the save
        assert _max_diff(result["resumed_importance"], saved_after_exp1) == 0.0
        # Resumed and uninterrupted runs train experience 2 identically.
        assert _max_diff(result["resumed_params"], result["params"]) == 0.0


def test_checkpoint_saved_unwrapped_loads_in_a_single_process(run: SimpleNamespace) -> None:
    strategy = make_naive(make_mlp((32, 32), seed=5), [SPGPlugin()], evaluator=_evaluator())
    strategy, _ = maybe_load_checkpoint(strategy, run.out / "portable.pkl")
    assert not isinstance(strategy.model, nn.parallel.DistributedDataParallel)
    assert _max_diff(_params(strategy.model), run.ranks[0]["params"]) == 0.0
    assert _max_diff(find_plugin(strategy, SPGPlugin).importance, run.ranks[0]["importance"]) == 0.0


def test_parameter_check_detects_a_difference_and_broadcast_uses_rank_zero(
    run: SimpleNamespace,
) -> None:
    for result in run.ranks:
        assert "features.1.bias" in result["probe_error"]
        assert "features.1.weight" not in result["probe_error"]
        assert result["broadcast"] == "from rank 0"


# ------------------------------------------------- class-incremental importance on two ranks
class _SingleHeadNet(nn.Module):
    """Two hidden layers and one growing classifier (global labels, no task labels)."""

    def __init__(self) -> None:
        super().__init__()
        from avalanche.models import IncrementalClassifier

        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        self.classifier = IncrementalClassifier(12, initial_out_features=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _class_benchmark() -> Any:
    """Digits, classes 0,1 | 2,3 | 4,5 | ... with global labels and no task labels."""
    return make_digits_benchmark(
        5, task_labels=False, n_train=500, n_test=50, fixed_class_order=range(10)
    )


class _ReadLog(Dataset):
    """An experience's training data that records every position read from it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        self.read.append(int(index))
        return self.dataset[index]


def _class_pass(model: nn.Module, state: dict[str, Any], experience: Any) -> tuple[Any, list[int]]:
    """``SPGPlugin(class_incremental=True)`` loaded with ``state`` runs its end-of-experience
    pass on ``model`` (one process, or this rank of a process group): the importance it ends
    with, and the positions of the experience's data it read."""
    spg = SPGPlugin(class_incremental=True)
    spg.load_state_dict(state)
    data = _ReadLog(experience.dataset.train())
    stand_in = SimpleNamespace(
        dataset=data,
        task_labels=[0],
        classes_in_this_experience=experience.classes_in_this_experience,
    )
    # The per-process minibatch: the reference minibatch is GLOBAL_BATCH in both cases.
    strategy = SimpleNamespace(
        model=model,
        experience=stand_in,
        device="cpu",
        train_mb_size=GLOBAL_BATCH // world_size(),
    )
    spg.after_training_exp(strategy)
    return spg.importance, data.read


def _class_worker(rank: int, out_dir: str, port: int) -> None:
    _torchrun_environment(rank, port)
    out = Path(out_dir)
    result: dict[str, Any] = {"failures": []}
    try:
        setup = init_distributed(seed=0, use_cuda=False)
        result["world_size"] = setup.world_size
        saved = torch.load(out / "class_exp2.pt", weights_only=False)
        model = nn.parallel.DistributedDataParallel(saved["model"])
        experience = _class_benchmark().train_stream[2]
        result["importance"], result["read"] = _class_pass(model, saved["before"], experience)
        cleanup_distributed()
    except BaseException:
        result["failures"].append(traceback.format_exc())
        raise
    finally:
        torch.save(result, out / f"class_rank{rank}.pt")


@pytest.fixture(scope="module")
def class_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Experiences 0-2 of a class-incremental stream trained in one process; then the pass
    after experience 2 again, from the plugin's state after experience 1, in this process and
    on two ranks."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ddp_class")
    benchmark = _class_benchmark()
    model = _SingleHeadNet()
    spg = SPGPlugin(class_incremental=True)
    states: list[dict[str, Any]] = []
    keep = CallbackProbe(after_training_exp=lambda _: states.append(spg.state_dict()))
    strategy = make_naive(model, [spg, keep], lr=LR, train_mb_size=GLOBAL_BATCH, train_epochs=2)
    for experience in benchmark.train_stream[:3]:
        strategy.train(experience)
    torch.save({"model": model, "before": states[1]}, out / "class_exp2.pt")
    experience = benchmark.train_stream[2]
    single, read = _class_pass(copy.deepcopy(model), states[1], experience)
    _launch(_class_worker, out)
    return SimpleNamespace(
        trained=spg.importance,
        single=single,
        read=read,
        n_samples=len(experience.dataset),
        ranks=[torch.load(out / f"class_rank{r}.pt", weights_only=False) for r in range(2)],
    )


def test_class_incremental_pass_reads_one_shard_per_rank(class_run: SimpleNamespace) -> None:
    """The current loss and the two earlier class groups: three passes over the data. One
    process reads every sample in each; rank ``r`` of two only the positions ``r, r + 2, ...``."""
    n = class_run.n_samples
    assert n % GLOBAL_BATCH != 0  # a smaller last reference minibatch is covered
    assert class_run.read == list(range(n)) * 3
    for rank, result in enumerate(class_run.ranks):
        assert result["failures"] == [], f"rank {rank}: {result['failures']}"
        assert result["world_size"] == WORLD_SIZE
        assert result["read"] == list(range(rank, n, WORLD_SIZE)) * 3


def test_class_incremental_sharded_importance_equals_single_process(
    class_run: SimpleNamespace,
) -> None:
    single = class_run.single
    # The stand-in strategy reproduces what the plugin computed while training.
    assert all(torch.equal(single[n], class_run.trained[n]) for n in class_run.trained)
    # Not a comparison of zeros: the features and the rows of every class seen carry importance.
    assert float(single["features.0.weight"].max()) > 0.3
    rows = single["classifier.classifier.weight"]
    assert rows.shape == (6, 12) and all(float(rows[c].max()) > 0.3 for c in range(6))
    first, second = (result["importance"] for result in class_run.ranks)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert _max_diff(first, single) <= 1e-6


# ------------------------------------------------------------------ single-process behaviour
def test_helpers_are_no_ops_without_a_process_group() -> None:
    setup = init_distributed(seed=0, use_cuda=False)
    assert (setup.rank, setup.world_size, setup.is_main, setup.distributed) == (0, 1, True, False)
    model = make_mlp((8,))
    check_parameters_synchronized(model)  # nothing to compare with
    plugin = DistributedSupportPlugin()
    strategy = SimpleNamespace(model=model)
    plugin.before_training_exp(strategy)
    assert strategy.model is model
    assert broadcast_from_main("value") == "value"
    cleanup_distributed()


def test_add_distributed_support_appends_the_plugin_once() -> None:
    strategy = make_naive(make_mlp((8,)), [SPGPlugin()])
    plugin = add_distributed_support(strategy)
    assert isinstance(plugin, DistributedSupportPlugin)
    assert add_distributed_support(strategy) is plugin
    assert sum(isinstance(p, DistributedSupportPlugin) for p in strategy.plugins) == 1


def test_per_rank_batch_size_splits_the_global_batch() -> None:
    assert per_rank_batch_size(64, 2) == 32
    assert per_rank_batch_size(64, 1) == 64
    with pytest.raises(ValueError, match="multiple"):
        per_rank_batch_size(64, 3)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: per_rank_batch_size(64.0, 2), "got 64.0"),  # returned 32.0, a float batch
        (lambda: per_rank_batch_size(True, 1), "got True"),
        (lambda: DistributedSupportPlugin(full_eval="no"), "full_eval must be True or False"),
        (lambda: init_distributed(seed=-1, use_cuda=False), "seed must be an int"),
        (lambda: init_distributed(seed="0", use_cuda=False), "got '0'"),
    ],
)
def test_helpers_name_a_bad_argument(call: Any, named: str) -> None:
    """A truthy string for full_eval used to act as True; a float batch came back a float."""
    with pytest.raises(ValueError, match=named):
        call()


def test_add_distributed_support_refuses_to_ignore_full_eval() -> None:
    """The strategy's plugin evaluates the whole stream; asking for sharded evaluation used to
    return it silently."""
    strategy = make_naive(make_mlp((8,)), [SPGPlugin(), DistributedSupportPlugin()])
    with pytest.raises(ValueError, match="full_eval=True"):
        add_distributed_support(strategy, full_eval=False)
