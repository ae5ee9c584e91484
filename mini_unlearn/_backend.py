"""Loads the native extension (mini_unlearn._C) or falls back to the pure-PyTorch reference."""
from __future__ import annotations

import os
import warnings

import torch

_NATIVE = False
_ERROR: str | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.mini_unlearn.*)

    _NATIVE = True
except ImportError as exc:  # not built: stay usable on the reference ops
    _ERROR = str(exc)
    if os.environ.get("MINI_UNLEARN_REQUIRE_NATIVE") == "1":
        raise ImportError(
            f"mini_unlearn: the native extension mini_unlearn._C is required "
            f"(MINI_UNLEARN_REQUIRE_NATIVE=1) but could not be imported: {exc}. "
            "Build it with `pip install --no-build-isolation -e .`."
        ) from exc
    warnings.warn(
        f"mini_unlearn: native extension not available ({exc}); using the pure-PyTorch "
        "reference ops (slower). Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def backend() -> str:
    """"native" when the C++/CUDA kernels are loaded, else "reference"."""
    return "native" if _NATIVE else "reference"


def has_cuda_kernels() -> bool:
    """True when the native library registered CUDA kernels for every op."""
    if not _NATIVE:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"mini_unlearn::{name}", "CUDA")
        for name in OP_NAMES
    )


OP_NAMES = (
    "quantize_blockwise",
    "dequantize_blockwise",
    "dequant_dot",
    "dequant_axpy",
    "contraction_accumulate",
    "contraction_accumulate_q",
    "contraction2_accumulate",
)
