"""Compressed storage of training history: :class:`GradientLog`, whole or sharded across ranks.

A log holds, for a chosen, ordered set of model parameters (names, shapes, dtypes):

* **entries** -- named vectors/tensors (anchor weights, anchor gradient, K-FAC eigenvectors,
  spectra, ...), each stored as an :class:`~mini_unlearn.ops.Compressed` in one of the formats
  ``fp32``/``bf16``/``int8``/``int4``, or as a plain tensor (``exact=True``) for small things
  that must stay bit-identical;
* **row lists** -- named lists of history rows (all of one format and length), exposed as
  stacked rows for :func:`~mini_unlearn.ops.rows_dot` / :func:`~mini_unlearn.ops.rows_axpy`;
* **meta** -- a JSON-able dict (n_train, weight decay, lr, loss reduction, modes, ...; the
  format, block and library version are filled in).

Under data parallelism a log may be a **shard** (rank k of N): every flat vector (1-D, one
element per logged parameter element: anchors, gradient/weight rows) is split into balanced,
block-aligned contiguous ranges and each rank keeps only its own; small entries are replicated
or owned whole by one rank (:meth:`GradientLog.shard_of`, :meth:`~GradientLog.full_row`,
:meth:`~GradientLog.from_shards`, :meth:`~GradientLog.gather`).

On disk a log is a directory written by :meth:`GradientLog.save` (one process, or collectively by
all ranks of a sharded log) and read back, fully validated and resharded as asked, by
:meth:`GradientLog.load` (safetensors + JSON only, nothing is unpickled).

Modules: ``_format`` (manifest, layouts, checksums, slicing), ``_atomic`` (fsync, versioned
directories, ``CURRENT``), ``_gradient_log`` (the in-memory log), ``_io`` (save/load),
``_dist`` (torch.distributed collectives without pickle).
"""
from ._format import FORMAT_VERSION, assign_owners, shard_range
from ._gradient_log import GradientLog, Placement

__all__ = ["GradientLog", "FORMAT_VERSION", "Placement", "assign_owners", "shard_range"]
