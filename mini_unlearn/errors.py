"""Typed errors: each says what went wrong and what to do."""


class MiniUnlearnError(Exception):
    """Base class of every error mini_unlearn raises on purpose."""


class LogFormatError(MiniUnlearnError):
    """A saved log is truncated, corrupted, of another version, or not a log at all."""


class LogMismatchError(MiniUnlearnError):
    """A log was recorded for parameters other than the model's (names, shapes or dtypes)."""


class ForgetSetError(MiniUnlearnError, ValueError):
    """The forget set is empty, too large, out of range, repeated, or of the wrong shape."""


class NonFiniteError(MiniUnlearnError, FloatingPointError):
    """NaN or Inf appeared in a gradient, a loss or a log."""


class LineSearchError(MiniUnlearnError, RuntimeError):
    """A line search exhausted its halvings without sufficient decrease."""


class UnsupportedTrainingError(MiniUnlearnError, ValueError):
    """An optimizer, layer or loss set-up mini_unlearn does not support (refused, never approximated)."""


class CurvatureScaleError(MiniUnlearnError, ArithmeticError):
    """The logged curvature says training itself would have diverged in some direction under the
    recorded optimizer (spectral radius ≥ 1): its scale is wrong, so the result would be amplified."""


class LinearisationError(MiniUnlearnError, ArithmeticError):
    """The unlearned model's predictions on the forget set moved far more than the log's curvature
    predicts for its step: the linearised retraining does not hold for this model at this forget
    ratio, so the answer cannot be stood behind."""
