"""Unlearning methods, each a ``run(model, log, forget, loss_fn, **kw) -> dict`` on a private
copy of the model. ``mini_unlearn.unlearn(method=NAME)`` dispatches here."""
from . import mini
from . import baselines, nabla_tau

METHODS = {"mini": mini.run}
METHODS["nabla_tau"] = nabla_tau.run
METHODS["retrain"] = baselines.retrain
METHODS["finetune"] = baselines.finetune
METHODS["neggrad"] = baselines.neggrad
from . import deltagrad  # noqa: E402
METHODS["deltagrad"] = deltagrad.run
from . import gradient_ascent, salun, scrub  # noqa: E402
METHODS["salun"] = salun.salun
METHODS["rl"] = salun.rl
METHODS["scrub"] = scrub.run
METHODS["ga"] = gradient_ascent.run
