"""Tiny datasets written in the exact on-disk layouts that torchvision / Avalanche read, so that
the construction code of every benchmark can be tested without any download.

* MNIST / Fashion-MNIST: the four unzipped IDX files in ``<root>/<Name>/raw/`` (and their
  ``.gz`` versions for the Debian system-copy path);
* CIFAR-10 / CIFAR-100: the python-pickle batches of the official archives
  (``cifar-10-batches-py/data_batch_1..5, test_batch``; ``cifar-100-python/train, test``);
* TinyImageNet: ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` and ``val/val_annotations.txt``.

Each image encodes its class in its pixels (a constant offset per class), so a test can check
that the labels that come out belong to the images that come out.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def class_images(
    labels: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """uint8 images whose mean grows with the class (class c -> about 20 * c + noise)."""
    noise = rng.integers(0, 8, size=(len(labels), *shape))
    return (noise + 20 * labels.reshape(-1, *([1] * len(shape)))).astype(np.uint8)


def _idx_images(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def _labels(n_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def write_idx_dataset(
    folder: Path, n_train_per_class: int = 6, n_test_per_class: int = 2, gz: bool = False
) -> dict[str, np.ndarray]:
    """Write a 10-class 28x28 IDX dataset into ``folder`` (unzipped, or ``.gz`` if ``gz``)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = _labels(10, per_class)
        images = class_images(labels, (28, 28), rng)
        out[f"{split}_labels"] = labels
        image_name, label_name = IDX_NAMES[split]
        for name, payload in ((image_name, _idx_images(images)), (label_name, _idx_labels(labels))):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as fh:
                    fh.write(payload)
            else:
                (folder / name).write_bytes(payload)
    return out


def write_cifar(
    root: Path, n_classes: int, n_train_per_class: int = 4, n_test_per_class: int = 2
) -> None:
    """Write CIFAR-10 (``n_classes=10``) or CIFAR-100 (100) in the python-pickle layout."""
    rng = np.random.default_rng(0)

    def batch(labels: np.ndarray, key: str) -> dict[str, object]:
        images = class_images(labels % 12, (3, 32, 32), rng).reshape(len(labels), -1)
        return {"data": images, key: labels.tolist(), "batch_label": "fake"}

    train_labels = rng.permutation(_labels(n_classes, n_train_per_class))
    test_labels = _labels(n_classes, n_test_per_class)
    if n_classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        for i, chunk in enumerate(np.array_split(train_labels, 5), 1):
            with open(base / f"data_batch_{i}", "wb") as fh:
                pickle.dump(batch(chunk, "labels"), fh)
        with open(base / "test_batch", "wb") as fh:
            pickle.dump(batch(test_labels, "labels"), fh)
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for name, labels in (("train", train_labels), ("test", test_labels)):
            with open(base / name, "wb") as fh:
                pickle.dump(batch(labels, "fine_labels"), fh)


def write_tinyimagenet(
    base: Path, n_train_per_class: int = 1, n_val_per_class: int = 1
) -> list[str]:
    """Write a 200-class, 64x64 TinyImageNet tree under ``base/tiny-imagenet-200``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = base / "tiny-imagenet-200"
    wnids = [f"n{index:08d}" for index in range(200)]
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True, exist_ok=True)
        pixels = class_images(
            np.array([c % 12] * (n_train_per_class + n_val_per_class)), (64, 64, 3), rng
        )
        for i in range(n_train_per_class):
            Image.fromarray(pixels[i]).save(images / f"{wnid}_{i}.JPEG", quality=95)
        for i in range(n_val_per_class):
            name = f"val_{c}_{i}.JPEG"
            Image.fromarray(pixels[n_train_per_class + i]).save(
                folder / "val" / "images" / name, quality=95
            )
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return wnids
