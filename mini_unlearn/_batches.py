"""Iterating over data given as (X, y) tensors, a Dataset or a DataLoader."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import ForgetSetError


def batches(data, batch_size: int = 512, device: torch.device | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) minibatches of ``data`` in order, moved to ``device``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        X, y = data
        for s in range(0, X.shape[0], batch_size):
            yield _to(X[s:s + batch_size], device), _to(y[s:s + batch_size], device)
        return
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, DataLoader):
        for xb, yb in data:
            yield _to(xb, device), _to(yb, device)
        return
    raise TypeError(f"data must be (X, y) tensors, a Dataset or a DataLoader, got {type(data).__name__}")


def _to(t: torch.Tensor, device):
    return t if device is None else t.to(device, non_blocking=True)


def count(data) -> int:
    """Number of samples in ``data``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        if data[0].shape[0] != data[1].shape[0]:
            raise ForgetSetError(f"X has {data[0].shape[0]} rows but y has {data[1].shape[0]}")
        return int(data[0].shape[0])
    if isinstance(data, DataLoader):
        return len(data.dataset)
    if isinstance(data, Dataset):
        return len(data)
    raise TypeError(f"data must be (X, y) tensors, a Dataset or a DataLoader, got {type(data).__name__}")


def subset(data, indices: torch.Tensor):
    """Rows ``indices`` of ``data`` as (X, y) tensors (or a Subset of a Dataset)."""
    if isinstance(data, (tuple, list)) and torch.is_tensor(data[0]):
        return data[0][indices], data[1][indices]
    ds = data.dataset if isinstance(data, DataLoader) else data
    return torch.utils.data.Subset(ds, indices.tolist())
