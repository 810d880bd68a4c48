"""Data sources. Each loader returns the whole pool (official train + test merged,
as PFLlib does) as uint8 N×C×H×W images and int64 labels."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from htfl_plugins.data.types import RawData
from htfl_plugins.errors import HtflError

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]


def _missing(name: str, looked: list, how: str) -> HtflError:
    where = ", ".join(str(p) for p in looked) or "nowhere (no --data-root given)"
    return HtflError(f"{name} not found (looked in {where}); {how}")


def _corrupt(name: str, path, exc: Exception | str) -> HtflError:
    """One line naming the file and what is wrong with it."""
    if isinstance(exc, Exception):
        text = " ".join(str(exc).split())
        exc = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return HtflError(f"{name}: cannot read {path}: {exc}")


def _check_labels(name: str, path, y: np.ndarray, k: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= k):
        raise _corrupt(name, path, f"labels must lie in 0..{k - 1}, found {y.min()}..{y.max()}")


# ---------------------------------------------------------------- digits
def load_digits(root: str | None = None) -> RawData:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return RawData(x, d.target.astype(np.int64), 10, "digits", [str(i) for i in range(10)])


# ---------------------------------------------------------------- idx (MNIST family)
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise ValueError(f"expected {int(np.prod(dims))} values, found {arr.size}")
        return arr.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise _corrupt("IDX file", path, exc) from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_family(name: str, folders: list[Path], how: str, classes: list[str]) -> RawData:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for folder in folders:
        found = [_find_idx(folder, s) for s in stems]
        if all(found):
            arrays = [read_idx(p) for p in found]
            for p, a, ndim in zip(found, arrays, (3, 1, 3, 1)):
                if a.ndim != ndim:
                    raise _corrupt(name, p, f"expected a {ndim}-dimensional IDX array, "
                                            f"found shape {a.shape}")
            xtr, ytr, xte, yte = arrays
            for xs, ys, p in ((xtr, ytr, found[1]), (xte, yte, found[3])):
                if len(xs) != len(ys):
                    raise _corrupt(name, p, f"{len(ys)} labels for {len(xs)} images")
                _check_labels(name, p, ys, 10)
            x = np.concatenate([xtr, xte])[:, None]
            y = np.concatenate([ytr, yte]).astype(np.int64)
            return RawData(x, y, 10, name, classes)
    raise _missing(name, folders, how)


def _candidates(root: str | None, *subdirs: str) -> list[Path]:
    if not root:
        return []
    base = Path(root).expanduser()
    return [base] + [base / s for s in subdirs]


def load_fmnist(root: str | None = None) -> RawData:
    folders = _candidates(root, "FashionMNIST/raw", "fashion-mnist") + [Path(DEBIAN_FMNIST)]
    return _load_idx_family(
        "fmnist", folders,
        "install Debian's package (apt-get install dataset-fashion-mnist) or give --data-root "
        "with torchvision's FashionMNIST/raw files", FMNIST_CLASSES)


def load_mnist(root: str | None = None) -> RawData:
    folders = _candidates(root, "MNIST/raw", "mnist")
    return _load_idx_family(
        "mnist", folders, "give --data-root with torchvision's MNIST/raw files",
        [str(i) for i in range(10)])


# ---------------------------------------------------------------- CIFAR (python pickles)
def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, ImportError, UnicodeDecodeError, MemoryError) as exc:
        raise _corrupt("CIFAR batch", path, exc) from None
    if not isinstance(obj, dict):
        raise _corrupt("CIFAR batch", path, f"expected a pickled dict, found {type(obj).__name__}")
    return obj


def _cifar(name: str, root: str | None, folder: str, files: list[str], label_key: str,
           meta_file: str, names_key: str, k: int) -> RawData:
    looked = _candidates(root)
    partial = []
    for base in looked:
        d = base / folder
        if all((d / f).is_file() for f in files):
            xs, ys = [], []
            for f in files:
                batch = _unpickle(d / f)
                try:
                    x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
                except (KeyError, ValueError, TypeError) as exc:
                    raise _corrupt(name, d / f, exc) from None
                if len(x) != len(y):
                    raise _corrupt(name, d / f, f"{len(y)} labels for {len(x)} images")
                _check_labels(name, d / f, y, k)
                xs.append(x)
                ys.append(y)
            classes = []
            if (d / meta_file).is_file():
                classes = [str(c) for c in _unpickle(d / meta_file).get(names_key, [])]
            return RawData(np.concatenate(xs), np.concatenate(ys), k, name, classes)
        if d.is_dir():
            partial.append(f"{d} lacks " + ", ".join(f for f in files if not (d / f).is_file()))
    how = f"give --data-root containing torchvision's {folder}/ folder"
    if partial:
        how += " (" + "; ".join(partial) + ")"
    raise _missing(name, [b / folder for b in looked], how)


def load_cifar10(root: str | None = None) -> RawData:
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return _cifar("cifar10", root, "cifar-10-batches-py", files, "labels", "batches.meta",
                  "label_names", 10)


def load_cifar100(root: str | None = None) -> RawData:
    return _cifar("cifar100", root, "cifar-100-python", ["train", "test"], "fine_labels", "meta",
                  "fine_label_names", 100)


# ---------------------------------------------------------------- image folders
def _read_image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise _corrupt("image", path, exc) from None


def load_tinyimagenet(root: str | None = None) -> RawData:
    """Tiny-ImageNet-200 in its release layout: train/<wnid>/images/*.JPEG and
    val/images/*.JPEG with val/val_annotations.txt (the val labels are read from
    that file, not from the folder, so no class collapses into 0)."""
    looked = [b / "tiny-imagenet-200" for b in _candidates(root)] + _candidates(root)
    for d in looked:
        if (d / "wnids.txt").is_file() and (d / "train").is_dir():
            wnids = [w.strip() for w in (d / "wnids.txt").read_text().split() if w.strip()]
            index = {w: i for i, w in enumerate(wnids)}
            xs, ys = [], []
            for w in wnids:
                for p in sorted((d / "train" / w / "images").glob("*")):
                    xs.append(_read_image(p, 64))
                    ys.append(index[w])
            ann = d / "val" / "val_annotations.txt"
            if ann.is_file():
                for line in ann.read_text().splitlines():
                    parts = line.split("\t")
                    if len(parts) < 2:
                        continue
                    if parts[1] not in index:
                        raise HtflError(f"tinyimagenet: {ann} names unknown class {parts[1]!r}")
                    xs.append(_read_image(d / "val" / "images" / parts[0], 64))
                    ys.append(index[parts[1]])
            if not xs:
                raise HtflError(f"tinyimagenet: no images under {d}")
            return RawData(np.stack(xs), np.asarray(ys, dtype=np.int64), len(wnids),
                           "tinyimagenet", wnids)
    raise _missing("tinyimagenet", looked, "give --data-root containing tiny-imagenet-200/")


def load_flowers102(root: str | None = None) -> RawData:
    """Flowers102 in torchvision's layout: flowers-102/jpg/image_XXXXX.jpg and
    imagelabels.mat; images resized to 64×64 as PFLlib does."""
    looked = [b / "flowers-102" for b in _candidates(root)] + _candidates(root)
    for d in looked:
        if (d / "imagelabels.mat").is_file() and (d / "jpg").is_dir():
            from scipy.io import loadmat
            from scipy.io.matlab import MatReadError

            try:
                labels = np.asarray(loadmat(d / "imagelabels.mat")["labels"]).reshape(-1)
                labels = labels.astype(np.int64)
            except (OSError, KeyError, ValueError, TypeError, NotImplementedError,
                    MatReadError) as exc:
                raise _corrupt("flowers102", d / "imagelabels.mat", exc) from None
            if labels.size == 0:
                raise _corrupt("flowers102", d / "imagelabels.mat", "it holds no labels")
            # The file's labels are 1-based (1..102).
            _check_labels("flowers102", d / "imagelabels.mat", labels - 1, 102)
            xs = [_read_image(d / "jpg" / f"image_{i + 1:05d}.jpg", 64) for i in range(len(labels))]
            return RawData(np.stack(xs), labels - 1, 102, "flowers102")
    raise _missing("flowers102", looked, "give --data-root containing flowers-102/")


SOURCES = {
    "digits": (load_digits, "scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes)"),
    "fmnist": (load_fmnist, "Fashion-MNIST, 28×28 grey (70,000 images, 10 classes)"),
    "mnist": (load_mnist, "MNIST, 28×28 grey (70,000 images, 10 classes)"),
    "cifar10": (load_cifar10, "CIFAR-10, 32×32 RGB (60,000 images, 10 classes)"),
    "cifar100": (load_cifar100, "CIFAR-100, 32×32 RGB (60,000 images, 100 classes)"),
    "tinyimagenet": (load_tinyimagenet, "Tiny-ImageNet-200, 64×64 RGB (120,000 images, 200 classes)"),
    "flowers102": (load_flowers102, "Oxford Flowers-102 resized to 64×64 (8,189 images, 102 classes)"),
}

# PFLlib's default classes per client for the pathological partition.
PAT_DEFAULTS = {"cifar100": 10, "flowers102": 10, "tinyimagenet": 20}


def default_classes_per_client(dataset: str, num_classes: int) -> int:
    return PAT_DEFAULTS.get(dataset, 2 if num_classes <= 10 else max(2, num_classes // 10))


def cache_home() -> Path:
    return Path(os.environ.get("HTFL_HOME", Path.home() / ".cache" / "htfl"))
