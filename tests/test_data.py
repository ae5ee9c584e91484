"""Data loaders and forget splits (no network)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mini_unlearn import data as D
from mini_unlearn.data import class_split, forget_split, load_dataset
from mini_unlearn.errors import ForgetSetError


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_unit_scaling_by_default():
    ds = load_dataset("digits", seed=0)
    assert ds.X_train.min() >= 0 and ds.X_train.max() <= 1 and ds.X_train.max() > 0.99
    assert torch.allclose(ds.X_test * 16, (ds.X_test * 16).round(), atol=1e-5)  # pixel / 16
    with pytest.raises(ValueError, match="preprocess"):
        load_dataset("digits", preprocess="whiten")


def test_digits_shapes_and_standardisation():
    ds = load_dataset("digits", seed=0, preprocess="standardize")
    assert ds.n_train == 1437 and ds.X_test.shape == (360, 64)
    assert ds.num_classes == 10 and ds.num_features == 64
    assert ds.X_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # standardised from training statistics: zero mean, at most unit std (constant pixels stay 0)
    assert ds.X_train.mean(0).abs().max() < 1e-5
    std = ds.X_train.std(0, unbiased=False)
    assert std.max() <= 1.0 + 1e-5 and (std > 0.9).sum() > 40
    assert torch.isfinite(ds.X_test).all() and ds.X_test.abs().max() < 100
    # stratified: every class in both parts, in proportion
    assert torch.bincount(ds.y_test, minlength=10).min() >= 30
    # seeded
    again = load_dataset("digits", seed=0, preprocess="standardize")
    other = load_dataset("digits", seed=1, preprocess="standardize")
    assert torch.equal(ds.X_train, again.X_train) and torch.equal(ds.y_test, again.y_test)
    assert not torch.equal(ds.y_train, other.y_train)
    assert "digits" in repr(ds)


def test_mnist5k():
    ds = load_dataset("mnist5k", seed=0)
    assert ds.X_train.shape == (4000, 784) and ds.X_test.shape == (1000, 784)
    assert ds.y_train.shape == (4000,) and ds.num_classes == 10
    assert torch.bincount(ds.y_train).tolist() == [400] * 10
    assert torch.isfinite(ds.X_train).all() and torch.isfinite(ds.X_test).all()
    assert ds.X_test.abs().max() < 100  # constant pixels do not blow up on test data


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_with_test(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(3.0, 5.0, size=(50, 4))
    X[:, 3] = 7.0  # a constant feature must not produce NaN/Inf
    y = rng.integers(0, 3, size=50)
    Xt = rng.normal(3.0, 5.0, size=(20, 4))
    yt = rng.integers(0, 3, size=20)
    ds = load_dataset(_write_npz(tmp_path / "toy.npz", X=X, y=y, X_test=Xt, y_test=yt))
    assert ds.name == "toy" and ds.n_train == 50 and ds.n_test == 20 and ds.num_classes == 3
    assert torch.equal(ds.y_train, torch.from_numpy(y)) and torch.equal(ds.y_test, torch.from_numpy(yt))
    mean, scale = X.mean(0), X.std(0)
    scale[3] = 1.0
    np.testing.assert_allclose(ds.X_train.numpy(), (X - mean) / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.X_test.numpy(), (Xt - mean) / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.feature_mean.numpy(), mean, rtol=1e-6)


def test_npz_without_test_is_split(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 3, 2)).astype(np.float32)  # trailing dims are flattened
    y = np.repeat(np.arange(4), 25)
    ds = load_dataset(str(_write_npz(tmp_path / "d.npz", X=X, y=y)), seed=3)
    assert ds.n_train == 80 and ds.n_test == 20 and ds.num_features == 6
    assert torch.bincount(ds.y_test).tolist() == [5, 5, 5, 5]
    ds2 = load_dataset(str(tmp_path / "d.npz"), seed=3)
    assert torch.equal(ds.X_train, ds2.X_train)


@pytest.mark.parametrize("arrays, match", [
    ({"X": np.zeros((5, 2))}, "missing"),
    ({"y": np.zeros(5, dtype=int)}, "missing"),
    ({"X": np.zeros(5), "y": np.zeros(5, dtype=int)}, "shape"),
    ({"X": np.zeros((5, 2)), "y": np.zeros(4, dtype=int)}, "labels but X has"),
    ({"X": np.full((5, 2), np.nan), "y": np.zeros(5, dtype=int)}, "NaN"),
    ({"X": np.zeros((5, 2)), "y": np.array([0, 1, 0.5, 1, 0])}, "integer"),
    ({"X": np.zeros((5, 2)), "y": np.array(["a", "b", "a", "b", "a"])}, "integer"),
    ({"X": np.zeros((5, 2)), "y": np.array([0, 1, -1, 1, 0])}, "negative"),
    ({"X": np.zeros((5, 2)), "y": np.zeros(5, dtype=int), "X_test": np.zeros((3, 2))}, "together"),
    ({"X": np.zeros((5, 2)), "y": np.zeros(5, dtype=int), "X_test": np.zeros((3, 3)),
      "y_test": np.zeros(3, dtype=int)}, "features"),
])
def test_malformed_npz(tmp_path, arrays, match):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(str(path))


def test_npz_float_integral_labels_accepted(tmp_path):
    X = np.random.default_rng(0).normal(size=(10, 2))
    y = np.array([0.0, 1.0] * 5)
    ds = load_dataset(_write_npz(tmp_path / "f.npz", X=X, y=y, X_test=X, y_test=y))
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 2


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "nope.npz"))
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="npz"):
        load_dataset(str(bad))
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")


def test_fashion_mnist_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_UNLEARN_DATA", str(tmp_path))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", (str(tmp_path / "absent"),))
    monkeypatch.setattr(D, "PROJECT_DATA_DIR", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    assert "MINI_UNLEARN_DATA" in str(info.value) and "make setup" in str(info.value)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def test_fashion_mnist_idx_files_from_env(tmp_path, monkeypatch):
    """A tiny stand-in for the Debian package's files, gzipped for train, plain for test."""
    rng = np.random.default_rng(0)
    tr_img = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    tr_lab = np.arange(30, dtype=np.uint8) % 10
    te_img = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    te_lab = np.arange(10, dtype=np.uint8)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr_img)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(tr_lab)))
    (d / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(te_img))
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(te_lab))
    monkeypatch.setenv("MINI_UNLEARN_DATA", str(tmp_path))
    monkeypatch.setattr(D, "SYSTEM_DATA_DIRS", ())
    ds = load_dataset("fashion-mnist", preprocess="standardize")
    assert ds.X_train.shape == (30, 784) and ds.X_test.shape == (10, 784) and ds.num_classes == 10
    assert ds.y_train.tolist() == tr_lab.tolist() and ds.y_test.tolist() == te_lab.tolist()
    scale = ds.feature_scale.double().numpy()
    mean = tr_img.reshape(30, -1).mean(0)
    np.testing.assert_allclose(ds.X_test.double().numpy(),
                               (te_img.reshape(10, -1) - mean) / scale, rtol=1e-4, atol=1e-4)
    # a truncated file is a clear error
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(te_lab)[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist")


def _fashion_present() -> bool:
    try:
        D._find_fashion()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _fashion_present(),
                    reason="Fashion-MNIST not found: `make setup` unpacks it into data/")
def test_fashion_mnist_installed():
    ds = load_dataset("fashion-mnist")
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert 0 <= float(ds.X_train.min()) and float(ds.X_train.max()) <= 1.0
    sub = D.train_subset(ds, 1000, seed=0)
    assert sub.n_train == 1000 and torch.bincount(sub.y_train).tolist() == [100] * 10
    assert sub.name == "fashion-mnist[1000]" and sub.X_test is ds.X_test


def test_project_data_dir_is_searched(tmp_path, monkeypatch):
    monkeypatch.delenv("MINI_UNLEARN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert D.data_dirs() == [D.PROJECT_DATA_DIR, tmp_path / "data"]
    assert D.PROJECT_DATA_DIR == Path(D.__file__).resolve().parent.parent / "data"
    monkeypatch.setenv("MINI_UNLEARN_DATA", str(tmp_path / "mine"))
    assert D.data_dirs()[0] == tmp_path / "mine"
    assert D.PROJECT_DATA_DIR / "fashion-mnist" in D._fashion_dirs()


def test_stratified_subset():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = D.stratified_subset(y, 10, seed=0)
    assert idx.dtype == torch.int64 and idx.tolist() == sorted(set(idx.tolist()))
    assert torch.bincount(y[idx], minlength=3).tolist() == [5, 3, 2]
    assert torch.equal(idx, D.stratified_subset(y, 10, seed=0))
    assert not torch.equal(idx, D.stratified_subset(y, 10, seed=1))
    # largest remainder: 7 of 100 -> 3.5, 2.1, 1.4 -> [4, 2, 1]
    assert torch.bincount(y[D.stratified_subset(y, 7, seed=0)], minlength=3).tolist() == [4, 2, 1]
    assert torch.equal(D.stratified_subset(y, 100), torch.arange(100))
    for bad in (0, 101, -3):
        with pytest.raises(ValueError, match="subset size"):
            D.stratified_subset(y, bad)


def test_train_subset_of_mnist5k():
    ds = load_dataset("mnist5k", seed=0)
    sub = D.train_subset(ds, 500, seed=3)
    assert sub.n_train == 500 and torch.bincount(sub.y_train).tolist() == [50] * 10
    assert sub.n_test == ds.n_test and sub.name == "mnist5k[500]"
    idx = D.stratified_subset(ds.y_train, 500, seed=3)
    assert torch.equal(sub.X_train, ds.X_train[idx])
    assert D.train_subset(ds, ds.n_train) is ds


def test_forget_split():
    f, r = forget_split(1000, 0.1, seed=0)
    assert f.dtype == torch.int64 and r.dtype == torch.int64
    assert f.numel() == 100 and r.numel() == 900
    assert torch.equal(torch.sort(torch.cat([f, r])).values, torch.arange(1000))
    assert torch.equal(f, torch.sort(f).values) and torch.equal(r, torch.sort(r).values)
    assert torch.unique(f).numel() == 100
    f2, _ = forget_split(1000, 0.1, seed=0)
    f3, _ = forget_split(1000, 0.1, seed=1)
    assert torch.equal(f, f2) and not torch.equal(f, f3)
    assert forget_split(4000, 0.5, seed=0)[0].numel() == 2000
    for bad in (0.0, 1.0, -0.1, 1e-6):
        with pytest.raises(ForgetSetError):
            forget_split(100, bad, seed=0)
    with pytest.raises(ValueError):  # ForgetSetError is a ValueError
        forget_split(100, 1.5)


def test_class_split():
    y = torch.tensor([0, 1, 2, 1, 0, 1])
    f, r = class_split(y, 1)
    assert f.tolist() == [1, 3, 5] and r.tolist() == [0, 2, 4]
    f, r = class_split(y, [0, 2])
    assert f.tolist() == [0, 2, 4] and r.tolist() == [1, 3, 5]
    with pytest.raises(ForgetSetError):
        class_split(y, 7)
