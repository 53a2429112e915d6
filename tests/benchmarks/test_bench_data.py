"""Stream construction for every benchmark, from tiny local files in the real on-disk layouts
(no download is possible or attempted), and the properties every stream must have: task
labels, labels from 0 in each task, disjoint classes that cover the dataset, class order
shuffled by the seed, consistent permutations, subsampling."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from fake_datasets import write_cifar, write_idx_dataset, write_tinyimagenet

from benchmarks import data
from benchmarks.catalog import BENCHMARKS


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args!r}")

    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)
    data.load_source.cache_clear()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    write_idx_dataset(root / "MNIST" / "raw")
    write_idx_dataset(root / "FashionMNIST" / "raw")
    write_cifar(root, 10)
    write_cifar(root, 100)
    write_tinyimagenet(root / "tinyimagenet")
    return root


def _check_stream(stream: data.TaskStream, name: str) -> None:
    info = BENCHMARKS[name]
    assert stream.n_tasks == info.n_tasks
    for task in stream.tasks:
        assert len(task.y_train) > 0 and len(task.y_test) > 0
        assert task.x_train.dtype == torch.float32
        assert tuple(task.x_train.shape[1:]) == stream.input_shape
        assert set(task.y_train.tolist()) == set(range(task.n_classes))  # labels from 0
        assert set(task.y_test.tolist()) <= set(range(task.n_classes))
        assert torch.isfinite(task.x_train).all()
    if info.kind == "split":
        all_classes = [c for task in stream.tasks for c in task.classes]
        assert len(all_classes) == len(set(all_classes))  # disjoint
        assert sorted(all_classes) == list(range(len(all_classes)))  # and covering


@pytest.mark.parametrize(
    "name, shape",
    [
        ("split-mnist", (1, 28, 28)),
        ("perm-mnist", (1, 28, 28)),
        ("split-fmnist", (1, 28, 28)),
        ("perm-fmnist", (1, 28, 28)),
        ("split-cifar10", (3, 32, 32)),
        ("c10", (3, 32, 32)),
        ("c20", (3, 32, 32)),
        ("t10", (3, 32, 32)),
        ("t20", (3, 32, 32)),
    ],
)
def test_every_file_based_benchmark_builds_from_local_files(
    data_root: Path, name: str, shape: tuple[int, ...]
) -> None:
    stream = data.build_stream(name, seed=0, data_root=data_root, download=False)
    assert stream.input_shape == shape
    _check_stream(stream, name)
    n_classes = {"mnist": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100, "tinyimagenet": 200}
    source = BENCHMARKS[name].source
    if BENCHMARKS[name].kind == "split":
        assert sum(t.n_classes for t in stream.tasks) == n_classes[source]


@pytest.mark.parametrize("name", ["split-digits", "perm-digits"])
def test_digits_benchmarks_build_offline(name: str) -> None:
    stream = data.build_stream(name, seed=0)
    assert stream.input_shape == (1, 8, 8)
    _check_stream(stream, name)
    # 1,797 images in one fixed stratified split: 75 % train, 25 % test.
    if name == "split-digits":
        assert sum(len(t.y_train) for t in stream.tasks) == 1347
        assert sum(len(t.y_test) for t in stream.tasks) == 450


def test_split_labels_follow_the_images(data_root: Path) -> None:
    # The fake images encode their class (mean ~ 20 * class); after remapping, each task's
    # label k must still be the images of the original class classes[k].
    stream = data.build_stream("split-mnist", seed=3, data_root=data_root, download=False)
    raw = data.load_source("mnist", str(data_root), False)
    for task in stream.tasks:
        for k, original in enumerate(task.classes):
            mine = task.x_train[task.y_train == k]
            theirs = raw[0][raw[1] == original]
            assert len(mine) == len(theirs)
            assert torch.allclose(mine.sort(dim=0).values, theirs.sort(dim=0).values)


def test_class_order_is_shuffled_by_the_seed_and_reproducible(data_root: Path) -> None:
    orders = [
        data.build_stream("c10", seed=s, data_root=data_root, download=False).description[
            "class_order"
        ]
        for s in (0, 1, 0)
    ]
    assert orders[0] == orders[2]
    assert orders[0] != orders[1]
    assert sorted(orders[0]) == list(range(100))


def test_permuted_tasks_shuffle_pixels_of_the_same_images(data_root: Path) -> None:
    stream = data.build_stream("perm-mnist", seed=0, data_root=data_root, download=False)
    x_train, y_train, x_test, _ = data.load_source("mnist", str(data_root), False)
    first_images = []
    for task in stream.tasks:
        # Same images (the same multiset of pixel values per image), same labels.
        assert torch.equal(
            task.x_train.flatten(1).sort(1).values, x_train.flatten(1).sort(1).values
        )
        assert torch.equal(task.x_test.flatten(1).sort(1).values, x_test.flatten(1).sort(1).values)
        assert torch.equal(task.y_train, y_train)
        first_images.append(task.x_train[0])
    assert not torch.equal(first_images[0], first_images[1])  # different permutations


def test_permutation_is_the_same_for_train_and_test_inputs() -> None:
    # With a probe dataset whose only image is the pixel index, the permuted train and test
    # images of a task must be identical.
    probe = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)

    def loader(source: str, root: str, download: bool) -> tuple[torch.Tensor, ...]:
        x = probe.repeat(10, 1, 1, 1)
        y = torch.arange(10)
        return x, y, x.clone(), y.clone()

    stream = data.build_stream("perm-digits", seed=5, loader=loader)
    for task in stream.tasks:
        assert torch.equal(task.x_train[0], task.x_test[0])
        assert sorted(task.x_train[0].flatten().tolist()) == list(range(64))


def test_fashion_mnist_falls_back_to_the_system_copy(tmp_path: Path) -> None:
    system = tmp_path / "system"
    write_idx_dataset(system, gz=True)
    root = tmp_path / "root"
    assert data.prepare_fashion_mnist(root, system_copy=system)
    raw = root / "FashionMNIST" / "raw"
    for name in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(system / f"{name}.gz", "rb") as fh:
            assert (raw / name).read_bytes() == fh.read()
    # torchvision accepts the unzipped files as present: no download.
    x_train, y_train, x_test, y_test = data.load_source("fmnist", str(root), False)
    assert x_train.shape == (60, 1, 28, 28) and x_test.shape == (20, 1, 28, 28)
    assert sorted(set(y_train.tolist())) == list(range(10))


def test_fashion_mnist_without_any_copy_reports_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    assert not data.prepare_fashion_mnist(tmp_path)
    with pytest.raises(RuntimeError, match="not found"):
        data.load_source("fmnist", str(tmp_path / "empty"), False)


def test_max_train_per_task_subsamples_train_only(data_root: Path) -> None:
    full = data.build_stream("perm-mnist", seed=0, data_root=data_root, download=False)
    cut = data.build_stream(
        "perm-mnist", seed=0, data_root=data_root, download=False, max_train_per_task=25
    )
    assert [len(t.y_train) for t in cut.tasks] == [25] * cut.n_tasks
    assert [len(t.y_test) for t in cut.tasks] == [len(t.y_test) for t in full.tasks]
    split = data.build_stream(
        "split-cifar10", seed=0, data_root=data_root, download=False, max_train_per_task=4
    )
    for task in split.tasks:  # equal share per class
        assert torch.bincount(task.y_train).tolist() == [2, 2]


def test_train_fraction_and_validation_split(data_root: Path) -> None:
    stream = data.build_stream(
        "split-mnist",
        seed=0,
        data_root=data_root,
        download=False,
        train_fraction=0.5,
        validation_fraction=0.25,
    )
    for task in stream.tasks:
        # 12 training images per task (2 classes x 6) -> 6 kept -> 2 held out for validation.
        assert task.y_valid is not None and task.x_valid is not None
        assert len(task.y_valid) == 2 and len(task.y_train) == 4
        assert len(task.x_valid) == 2


def test_make_benchmark_gives_task_labelled_experiences() -> None:
    stream = data.build_stream("split-digits", seed=0)
    benchmark = data.make_benchmark(stream)
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 5
    for t, (train_exp, test_exp) in enumerate(zip(benchmark.train_stream, benchmark.test_stream)):
        assert train_exp.task_labels == [t] and test_exp.task_labels == [t]
        assert sorted(train_exp.classes_in_this_experience) == [0, 1]
        assert len(train_exp.dataset) == len(stream.tasks[t].y_train)


def test_unknown_benchmark_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="valid: split-digits"):
        data.build_stream("split-imagenet", seed=0)
    with pytest.raises(ValueError, match="train_fraction"):
        data.build_stream("split-digits", seed=0, train_fraction=1.5)
    with pytest.raises(ValueError, match="max_train_per_task"):
        data.build_stream("split-digits", seed=0, max_train_per_task=0)


def test_max_test_per_task_cuts_test_sets_only_and_leaves_training_unchanged() -> None:
    full = data.build_stream("split-digits", seed=1, max_train_per_task=40)
    cut = data.build_stream("split-digits", seed=1, max_train_per_task=40, max_test_per_task=15)
    assert cut.description["test_per_task"] == [15] * 5
    for a, b in zip(full.tasks, cut.tasks):
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
        # every kept test sample is one of the task's own, with its label
        rows = {tuple(x.tolist()): int(y) for x, y in zip(a.x_test.flatten(1), a.y_test)}
        assert all(rows[tuple(x.tolist())] == int(y) for x, y in zip(b.x_test.flatten(1), b.y_test))
    again = data.build_stream("split-digits", seed=1, max_train_per_task=40, max_test_per_task=15)
    assert all(torch.equal(a.x_test, b.x_test) for a, b in zip(cut.tasks, again.tasks))
    with pytest.raises(ValueError, match="max_test_per_task must be >= 1, got 0"):
        data.build_stream("split-digits", seed=1, max_test_per_task=0)
