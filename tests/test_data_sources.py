"""Data sources read from their real on-disk formats, written here in miniature."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from htfl_plugins.data import sources
from htfl_plugins.data.sources import (
    load_cifar10,
    load_cifar100,
    load_digits,
    load_flowers102,
    load_fmnist,
    load_mnist,
    load_tinyimagenet,
    read_idx,
)
from htfl_plugins.errors import HtflError
from htfl_plugins.plugins import get_plugins


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ writers
def cifar_rows(n: int, seed: int) -> np.ndarray:
    """n CIFAR rows (3072 bytes: 1024 red, 1024 green, 1024 blue, each row-major)."""
    rows = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    rows[:, 0] = 11        # red, pixel (0, 0)
    rows[:, 1] = 12        # red, pixel (0, 1)
    rows[:, 1024] = 22     # green, pixel (0, 0)
    rows[:, 2048 + 32] = 33  # blue, pixel (1, 0)
    return rows


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(root: Path, per_batch: int = 3) -> Path:
    d = root / "cifar-10-batches-py"
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        labels = [(i * per_batch + j) % 10 for j in range(per_batch)]
        dump(d / name, {"batch_label": name, "data": cifar_rows(per_batch, i), "labels": labels,
                        "filenames": [f"{name}_{j}.png" for j in range(per_batch)]})
    dump(d / "batches.meta", {"label_names": [f"class{c}" for c in range(10)],
                              "num_cases_per_batch": per_batch, "num_vis": 3072})
    return d


def write_cifar100(root: Path, n_train: int = 7, n_test: int = 5) -> Path:
    d = root / "cifar-100-python"
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        fine = [(37 * j + seed) % 100 for j in range(n)]
        dump(d / name, {"data": cifar_rows(n, seed), "fine_labels": fine,
                        "coarse_labels": [f // 5 for f in fine],
                        "filenames": [f"{name}_{j}.png" for j in range(n)]})
    dump(d / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)],
                      "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    return d


def save_jpeg(path: Path, size, colour, mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format="JPEG", quality=95)


TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
# class → a solid colour that survives JPEG
TINY_COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
TINY_VAL = [("val_0.JPEG", 2), ("val_1.JPEG", 1), ("val_2.JPEG", 2), ("val_3.JPEG", 0)]


def write_tiny(root: Path, per_class: int = 2) -> Path:
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    for c, w in enumerate(TINY_WNIDS):
        (d / "train" / w).mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for j in range(per_class):
            save_jpeg(d / "train" / w / "images" / f"{w}_{j}.JPEG", (64, 64), TINY_COLOURS[c])
    lines = []
    for name, c in TINY_VAL:
        save_jpeg(d / "val" / "images" / name, (64, 64), TINY_COLOURS[c])
        lines.append(f"{name}\t{TINY_WNIDS[c]}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    # one grey training image of another size: converted to RGB and resized
    save_jpeg(d / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_grey.JPEG",
              (40, 48), 128, mode="L")
    return d


def write_flowers(root: Path, labels_1based) -> Path:
    from scipy.io import savemat

    d = root / "flowers-102"
    for i, lab in enumerate(labels_1based):
        # sizes vary as in the real set; the loader resizes to 64×64
        save_jpeg(d / "jpg" / f"image_{i + 1:05d}.jpg", (50 + 7 * i, 40 + 3 * i),
                  (lab % 256, 100, 200))
    savemat(d / "imagelabels.mat", {"labels": np.asarray([labels_1based], dtype=np.uint8)})
    return d


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool, magic: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_family(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    paths = {stem: write_idx(folder / stem, a, gz) for stem, a in arrays.items()}
    return arrays, paths


# ------------------------------------------------------------------ registry
def test_registry_lists_every_source_with_its_class_count():
    reg = get_plugins().registry("datasets")
    expected = {"digits": 10, "fmnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100,
                "tinyimagenet": 200, "flowers102": 102}
    assert set(expected) <= set(reg.names())
    for name, k in expected.items():
        item = reg.get(name)
        assert item.meta["num_classes"] == k
        assert item.obj is sources.SOURCES[name][0]


# ------------------------------------------------------------------ digits
def test_digits():
    raw = load_digits()
    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.uint8
    assert raw.x.max() == 255 and raw.x.min() == 0
    assert raw.y.dtype == np.int64 and sorted(set(raw.y.tolist())) == list(range(10))
    assert raw.num_classes == 10


# ------------------------------------------------------------------ CIFAR
def test_cifar10_layout_and_pixel_order(tmp_path):
    write_cifar10(tmp_path, per_batch=3)
    raw = load_cifar10(str(tmp_path))
    assert raw.x.shape == (18, 3, 32, 32) and raw.x.dtype == np.uint8
    assert raw.y.dtype == np.int64 and raw.y.tolist() == [j % 10 for j in range(18)]
    assert raw.num_classes == 10 and raw.classes == [f"class{c}" for c in range(10)]
    # channel-major, then row-major
    assert (raw.x[:, 0, 0, 0] == 11).all() and (raw.x[:, 0, 0, 1] == 12).all()
    assert (raw.x[:, 1, 0, 0] == 22).all() and (raw.x[:, 2, 1, 0] == 33).all()
    # train batches first, test batch last
    assert np.array_equal(raw.x[-3:].reshape(3, -1), cifar_rows(3, 5))


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path, n_train=7, n_test=5)
    raw = load_cifar100(str(tmp_path))
    assert raw.x.shape == (12, 3, 32, 32) and raw.x.dtype == np.uint8
    assert raw.num_classes == 100
    fine = [(37 * j) % 100 for j in range(7)] + [(37 * j + 1) % 100 for j in range(5)]
    assert raw.y.tolist() == fine
    assert raw.classes[:2] == ["fine0", "fine1"] and len(raw.classes) == 100


def test_cifar_missing_root_names_where_it_looked(tmp_path):
    with pytest.raises(HtflError) as e:
        load_cifar10(str(tmp_path))
    text = one_line(e)
    assert str(tmp_path / "cifar-10-batches-py") in text and "--data-root" in text
    with pytest.raises(HtflError) as e:
        load_cifar100(None)
    assert "--data-root" in one_line(e)


def test_cifar_partial_folder_names_missing_files(tmp_path):
    d = write_cifar10(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(HtflError) as e:
        load_cifar10(str(tmp_path))
    assert "data_batch_3" in one_line(e)


def test_cifar_truncated_pickle(tmp_path):
    d = write_cifar10(tmp_path)
    blob = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(HtflError) as e:
        load_cifar10(str(tmp_path))
    assert str(d / "data_batch_2") in one_line(e)


def test_cifar_wrong_content(tmp_path):
    d = write_cifar100(tmp_path)
    dump(d / "test", {"data": cifar_rows(4, 0), "labels": [1, 2, 3, 4]})  # no fine_labels
    with pytest.raises(HtflError) as e:
        load_cifar100(str(tmp_path))
    assert str(d / "test") in one_line(e)
    dump(d / "test", {"data": cifar_rows(4, 0), "fine_labels": [1, 2, 3]})  # count mismatch
    with pytest.raises(HtflError) as e:
        load_cifar100(str(tmp_path))
    assert str(d / "test") in one_line(e)
    dump(d / "test", [1, 2, 3])  # not a dict
    with pytest.raises(HtflError) as e:
        load_cifar100(str(tmp_path))
    assert str(d / "test") in one_line(e)


# ------------------------------------------------------------------ Tiny-ImageNet
def test_tinyimagenet_val_labels_from_annotations(tmp_path):
    write_tiny(tmp_path, per_class=2)
    raw = load_tinyimagenet(str(tmp_path))
    n_train = 3 * 2 + 1
    assert raw.x.shape == (n_train + len(TINY_VAL), 3, 64, 64) and raw.x.dtype == np.uint8
    assert raw.num_classes == 3 and raw.classes == TINY_WNIDS
    assert raw.y.dtype == np.int64
    assert sorted(raw.y[:n_train].tolist()) == [0, 0, 0, 1, 1, 2, 2]
    # val labels come from val_annotations.txt, in its order
    assert raw.y[n_train:].tolist() == [c for _, c in TINY_VAL]
    # and each image carries its class's colour (so labels and images stay paired)
    for img, lab in zip(raw.x, raw.y):
        mean = img.reshape(3, -1).mean(axis=1)
        if mean.std() < 1:  # the grey one
            assert lab == 0
            continue
        assert int(np.argmax(mean)) == int(np.argmax(TINY_COLOURS[lab]))


def test_tinyimagenet_root_may_be_the_folder_itself(tmp_path):
    d = write_tiny(tmp_path)
    assert len(load_tinyimagenet(str(d)).y) == 7 + len(TINY_VAL)


def test_tinyimagenet_missing(tmp_path):
    with pytest.raises(HtflError) as e:
        load_tinyimagenet(str(tmp_path))
    text = one_line(e)
    assert str(tmp_path / "tiny-imagenet-200") in text and "--data-root" in text


def test_tinyimagenet_non_image_jpeg(tmp_path):
    d = write_tiny(tmp_path)
    bad = d / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_1.JPEG"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(HtflError) as e:
        load_tinyimagenet(str(tmp_path))
    assert str(bad) in one_line(e)


def test_tinyimagenet_unknown_class_in_annotations(tmp_path):
    d = write_tiny(tmp_path)
    ann = d / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(HtflError) as e:
        load_tinyimagenet(str(tmp_path))
    assert "n99999999" in one_line(e)


# ------------------------------------------------------------------ Flowers102
def test_flowers102_labels_and_resize(tmp_path):
    labels = [1, 102, 5, 5, 77]
    write_flowers(tmp_path, labels)
    raw = load_flowers102(str(tmp_path))
    assert raw.x.shape == (5, 3, 64, 64) and raw.x.dtype == np.uint8
    assert raw.y.dtype == np.int64 and raw.y.tolist() == [lab - 1 for lab in labels]
    assert raw.num_classes == 102
    assert abs(int(raw.x[1, 1].mean()) - 100) < 8  # colours kept through the resize


def test_flowers102_missing_and_corrupt(tmp_path):
    with pytest.raises(HtflError) as e:
        load_flowers102(str(tmp_path))
    text = one_line(e)
    assert str(tmp_path / "flowers-102") in text and "--data-root" in text

    d = write_flowers(tmp_path, [3, 4, 5])
    (d / "jpg" / "image_00002.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(HtflError) as e:
        load_flowers102(str(tmp_path))
    assert str(d / "jpg" / "image_00002.jpg") in one_line(e)

    (d / "jpg" / "image_00002.jpg").unlink()
    with pytest.raises(HtflError) as e:
        load_flowers102(str(tmp_path))
    assert "image_00002.jpg" in one_line(e)

    (d / "imagelabels.mat").write_bytes(b"garbage, not a MATLAB file" * 10)
    with pytest.raises(HtflError) as e:
        load_flowers102(str(tmp_path))
    assert str(d / "imagelabels.mat") in one_line(e)


def test_flowers102_labels_out_of_range(tmp_path):
    write_flowers(tmp_path, [0, 1, 2])  # 0 is not a 1-based label
    with pytest.raises(HtflError) as e:
        load_flowers102(str(tmp_path))
    assert "imagelabels.mat" in one_line(e)


# ------------------------------------------------------------------ MNIST family (IDX)
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_mnist_idx(tmp_path, gz):
    arrays, _ = write_mnist_family(tmp_path / "MNIST" / "raw", 6, 4, gz)
    raw = load_mnist(str(tmp_path))
    assert raw.x.shape == (10, 1, 28, 28) and raw.x.dtype == np.uint8
    assert np.array_equal(raw.x[:6, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(raw.x[6:, 0], arrays["t10k-images-idx3-ubyte"])
    assert raw.y.dtype == np.int64
    assert raw.y.tolist() == (arrays["train-labels-idx1-ubyte"].tolist()
                              + arrays["t10k-labels-idx1-ubyte"].tolist())


@pytest.mark.parametrize("sub", ["FashionMNIST/raw", "fashion-mnist", "."])
def test_fmnist_idx_layouts(tmp_path, sub, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FMNIST", str(tmp_path / "no-debian-here"))
    write_mnist_family(tmp_path / sub, 5, 3, gz=True, seed=3)
    raw = load_fmnist(str(tmp_path))
    assert raw.x.shape == (8, 1, 28, 28) and raw.classes == sources.FMNIST_CLASSES


def test_read_idx_magic_numbers(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    p = write_idx(tmp_path / "img", images, gz=False)
    assert (p.read_bytes()[:4]) == b"\x00\x00\x08\x03"
    assert np.array_equal(read_idx(p), images)
    p = write_idx(tmp_path / "lab", np.array([3, 1, 4], dtype=np.uint8), gz=True)
    with gzip.open(p) as fh:
        assert fh.read(4) == b"\x00\x00\x08\x01"
    assert read_idx(p).tolist() == [3, 1, 4]


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_idx_bad_magic(tmp_path, gz):
    _, paths = write_mnist_family(tmp_path, 3, 2, gz)
    bad = write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), gz,
                    magic=0x00000D03)  # float data type: not what MNIST holds
    assert bad == paths["t10k-images-idx3-ubyte"]
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert str(bad) in one_line(e)


def test_idx_truncated_and_mismatched(tmp_path):
    _, paths = write_mnist_family(tmp_path, 3, 2, gz=False)
    p = paths["train-images-idx3-ubyte"]
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert str(p) in one_line(e)

    _, paths = write_mnist_family(tmp_path, 3, 2, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert "train-labels-idx1-ubyte" in one_line(e)

    _, paths = write_mnist_family(tmp_path, 3, 2, gz=False)
    p = paths["t10k-labels-idx1-ubyte"]
    p.write_bytes(p.read_bytes()[:3])  # shorter than the header
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert str(p) in one_line(e)


def test_idx_broken_gzip(tmp_path):
    _, paths = write_mnist_family(tmp_path, 3, 2, gz=True)
    p = paths["train-labels-idx1-ubyte"]
    p.write_bytes(p.read_bytes()[:12])
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert str(p) in one_line(e)
    p.write_bytes(b"plain bytes in a .gz file")
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    assert str(p) in one_line(e)


def test_mnist_missing(tmp_path):
    with pytest.raises(HtflError) as e:
        load_mnist(str(tmp_path))
    text = one_line(e)
    assert str(tmp_path / "MNIST" / "raw") in text and "--data-root" in text
    with pytest.raises(HtflError) as e:
        load_mnist(None)
    assert "no --data-root" in one_line(e)


def test_fmnist_missing_names_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FMNIST", str(tmp_path / "debian"))
    with pytest.raises(HtflError) as e:
        load_fmnist(str(tmp_path / "root"))
    text = one_line(e)
    assert str(tmp_path / "debian") in text and str(tmp_path / "root") in text
    assert "dataset-fashion-mnist" in text and "--data-root" in text


@pytest.mark.skipif(not os.path.isdir(sources.DEBIAN_FMNIST),
                    reason=f"Debian's Fashion-MNIST is not installed at {sources.DEBIAN_FMNIST}")
def test_debian_fashion_mnist():
    raw = load_fmnist(None)
    assert raw.x.shape == (70000, 1, 28, 28) and raw.x.dtype == np.uint8
    assert np.bincount(raw.y).tolist() == [7000] * 10
    assert raw.num_classes == 10
