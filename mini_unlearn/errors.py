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
    """An optimizer, layer or loss set-up mini_unlearn does not support."""
