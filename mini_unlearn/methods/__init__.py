"""Unlearning methods, each a ``run(model, log, forget, loss_fn, **kw) -> dict`` on a private
copy of the model. ``mini_unlearn.unlearn(method=NAME)`` dispatches here."""
from . import mini

METHODS = {"mini": mini.run}
