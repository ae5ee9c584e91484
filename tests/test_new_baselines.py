"""SalUn, SCRUB, RL and GA (mini_unlearn/methods/salun.py, scrub.py, gradient_ascent.py) through
``mu.unlearn`` on MNIST-5k with the MLP recipe, forgetting a random 10%: each moves the forget
accuracy toward retraining's, leaves the caller's model untouched, and follows its paper's
settings."""
import pytest
import torch

from conftest import vec

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.methods import METHODS
from mini_unlearn.methods.salun import saliency_mask
from mini_unlearn.methods.scrub import distill_kl

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = ("salun", "scrub", "rl", "ga")


def acc(m, X, y):
    with torch.no_grad():
        return float((m(X).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def mnist(one_thread):
    ds = load_dataset("mnist5k", seed=0)
    recipe = M.default_recipe("mlp", "sgd")
    make = lambda: M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)  # noqa: E731
    model = make()
    X, y = ds.X_train, ds.y_train
    M.train(model, X, y, recipe)
    log = mu.Recorder(model, checkpoints=0).finalize((X, y), M.loss_fn,
                                                     weight_decay=recipe.weight_decay, progress=False)
    f, r = forget_split(ds.n_train, 0.1, seed=1)
    ref = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, method="retrain", recipe=recipe,
                     make_model=make).model
    return dict(ds=ds, X=X, y=y, model=model, log=log, f=f, r=r, ref=ref, w0=vec(model).clone())


def _run(s, method, **kw):
    X, y, r = s["X"], s["y"], s["r"]
    return mu.unlearn(s["model"], s["log"], indices=s["f"], loss_fn=M.loss_fn, method=method,
                      retain=(X[r], y[r]), **kw)


def test_registered():
    for name in NEW:
        assert name in METHODS


def _gaps(s, res):
    X, y, f = s["X"], s["y"], s["f"]
    a_ref = acc(s["ref"], X[f], y[f])
    return abs(acc(s["model"], X[f], y[f]) - a_ref), abs(acc(res.model, X[f], y[f]) - a_ref)


@pytest.mark.parametrize("method", ["salun", "scrub", "rl"])
def test_moves_forget_accuracy_toward_retraining(mnist, method):
    s = mnist
    res = _run(s, method)
    gap_orig, gap_u = _gaps(s, res)
    assert gap_orig > 0.02  # the original still fits its forget set better than retraining
    assert gap_u < gap_orig, (method, gap_orig, gap_u)
    ds = s["ds"]
    assert acc(res.model, ds.X_test, ds.y_test) >= acc(s["model"], ds.X_test, ds.y_test) - 0.02
    assert res.grad_evals > 0 and res.certificate is None and not res.verified
    assert torch.equal(vec(s["model"]), s["w0"])  # the caller's model is untouched


def test_ga_default_does_not_move_forget_accuracy(mnist):
    """A measured limitation, kept visible: GA at its published default (lr 1e-4, 5 epochs,
    batch 256: 10 steps on 400 forget samples) changes no forget prediction on MNIST-5k, so it
    does not get closer to retraining there (the default is the papers', not tuned here)."""
    gap_orig, gap_u = _gaps(mnist, _run(mnist, "ga"))
    assert not gap_u < gap_orig


def test_ga_ascends_the_forget_loss(mnist):
    s = mnist
    X, y, f = s["X"], s["y"], s["f"]
    res = _run(s, "ga")
    loss = lambda m: float(M.loss_fn(m(X[f]), y[f]))  # noqa: E731
    with torch.no_grad():
        assert loss(res.model) > loss(s["model"])
    assert res.info["lr"] == 1e-4 and res.info["epochs"] == 5 and res.grad_evals == 5 * f.numel()
    # A larger explicit learning rate moves the forget accuracy (the loop works; the default is
    # the papers', not tuned here).
    gap_orig, gap_u = _gaps(s, _run(s, "ga", lr=1e-2))
    assert gap_u < gap_orig
    assert torch.equal(vec(s["model"]), s["w0"])


def test_salun_mask_is_top_half_of_forget_gradient(mnist):
    s = mnist
    X, y, f = s["X"], s["y"], s["f"]
    mask = saliency_mask(s["model"], (X[f], y[f]), M.loss_fn, threshold=0.5, batch_size=512)
    frac = sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask)
    assert abs(frac - 0.5) < 1e-3
    res = _run(s, "salun")
    assert res.info["salient_fraction"] == pytest.approx(frac)
    assert (res.info["lr"], res.info["epochs"], res.info["train_batch_size"]) == (0.013, 10, 256)
    # Non-salient weights get no gradient, only SGD's weight decay (through momentum): a linear
    # recursion with the same coefficients for every such weight, so all shrink by one factor.
    ratios, salient_moved = [], 0
    for p, q, m in zip(res.model.parameters(), s["model"].parameters(), mask):
        p, q = p.detach().double(), q.detach().double()
        sel = ~m & (q.abs() > 1e-2)
        ratios.append(p[sel] / q[sel])
        salient_moved += int(((p - q).abs() > 1e-6)[m].sum())
    ratios = torch.cat(ratios)
    assert ratios.numel() > 1000 and float(ratios.max() - ratios.min()) < 1e-4
    assert float(ratios.mean()) < 1.0 and salient_moved > 0.9 * sum(int(m.sum()) for m in mask)


def test_scrub_settings_and_kl():
    z = torch.randn(5, 10)
    assert float(distill_kl(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(5, 10)
    assert float(distill_kl(z, t, 4.0)) > 0


def test_scrub_info(mnist):
    res = _run(mnist, "scrub")
    info = res.info
    assert (info["epochs"], info["msteps"], info["lr"], info["temperature"]) == (3, 2, 5e-4, 4.0)
    assert res.passes == 5  # 3 min passes over retain + 2 max passes over forget
    n_f, n_r = mnist["f"].numel(), mnist["r"].numel()
    assert res.grad_evals == 2 * n_f + 3 * n_r


def test_missing_retain_raises(mnist):
    for method in ("salun", "scrub", "rl"):
        with pytest.raises(ValueError, match="retain"):
            mu.unlearn(mnist["model"], mnist["log"], indices=mnist["f"], loss_fn=M.loss_fn,
                       method=method)


@pytest.mark.parametrize("method", ["rl", "salun"])
def test_random_relabelling_refuses_per_token_targets(method):
    """RL and SalUn relabel a sample with one random class: per-token (sequence) targets are
    refused with a typed error, not a shape crash."""
    from mini_unlearn.methods.salun import _random_label_training

    X, Y = torch.zeros(4, 3), torch.zeros(4, 5, dtype=torch.long)
    with pytest.raises(mu.UnsupportedTrainingError, match="random class"):
        _random_label_training(method, torch.nn.Linear(3, 3), (X, Y), (X, Y), None, "cpu", False, mask=None,
                               num_classes=None, epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0,
                               train_batch_size=2, seed=0)
