"""mini_unlearn: fast machine unlearning for PyTorch.

Record a compressed, minimal log of training history while training, then remove a forget
set's influence with Mini-Unlearning (contraction mapping + minimal history) far faster than
retraining; baselines, evaluation against retraining and MIA, and kernel benchmarks included.
"""
from ._backend import backend, has_cuda_kernels
from .errors import (CurvatureScaleError, ForgetSetError, LinearisationError, LineSearchError,
                     LogFormatError, LogMismatchError, MiniUnlearnError, NonFiniteError,
                     UnsupportedTrainingError)
from . import ops
from .log import GradientLog
from .recorder import Recorder
from .unlearn import UnlearnResult, unlearn

__version__ = "0.1.0"

__all__ = [
    "backend", "has_cuda_kernels", "ops", "__version__", "GradientLog", "Recorder", "unlearn",
    "UnlearnResult",
    "MiniUnlearnError", "LogFormatError", "LogMismatchError", "ForgetSetError", "NonFiniteError",
    "LineSearchError", "UnsupportedTrainingError", "CurvatureScaleError", "LinearisationError",
]
