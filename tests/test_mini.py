"""Mini-Unlearning on real data (docs/math.md): one-shot and refresh on converged logistic
regression against the exact retained optimum; input validation; the caller's model is safe."""
import copy

import pytest
import torch

from conftest import acc, vec

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset

RATIOS = (0.01, 0.1, 0.3, 0.5)
loss_fn = M.loss_fn






class Converged:
    """A logistic regression trained to convergence, its log, and exact retrained optima."""

    def __init__(self, name, curvature="kfac", fmt="int8"):
        self.ds = load_dataset(name, seed=0, preprocess="unit")
        self.recipe = M.default_recipe("logreg")
        self.model = self.fit(None)
        self.log = mu.Recorder(self.model, checkpoints=0, compression=fmt, curvature=curvature).finalize(
            (self.ds.X_train, self.ds.y_train), loss_fn, weight_decay=self.recipe.weight_decay, progress=False)
        self._ref = {}

    def fit(self, indices):
        m = M.make_model("logreg", self.ds.num_features, self.ds.num_classes, seed=0)
        M.train(m, self.ds.X_train, self.ds.y_train, self.recipe, indices=indices)
        return m

    def split(self, ratio):
        return forget_split(self.ds.n_train, ratio, seed=1)

    def reference(self, key, retain_idx):
        if key not in self._ref:
            self._ref[key] = self.fit(retain_idx)
        return self._ref[key]

    def rel(self, m, ref):
        return float((vec(m) - vec(ref)).norm() / (vec(self.model) - vec(ref)).norm())


@pytest.fixture(scope="module")
def digits():
    return Converged("digits")


@pytest.fixture(scope="module")
def mnist():
    return Converged("mnist5k")


@pytest.mark.parametrize("name,bound", [("digits", 0.45), ("mnist", 0.40)])
def test_oneshot_and_refresh_track_the_retained_optimum(name, bound, request):
    c = request.getfixturevalue(name)
    ds = c.ds
    for ratio in RATIOS:
        f, r = c.split(ratio)
        ref = c.reference(ratio, r)
        one = mu.unlearn(c.model, c.log, indices=f, loss_fn=loss_fn, mode="oneshot")
        assert one.mode == "oneshot" and one.passes == 1 and not one.verified
        assert c.rel(one.model, ref) <= bound, (ratio, c.rel(one.model, ref))
        for X, y in ((ds.X_test, ds.y_test), (ds.X_train[f], ds.y_train[f])):
            assert abs(acc(one.model, X, y) - acc(ref, X, y)) <= 0.015
        ref_retain = (ds.X_train[r], ds.y_train[r])
        fresh = mu.unlearn(c.model, c.log, indices=f, loss_fn=loss_fn, mode="refresh", retain=ref_retain,
                           max_passes=8)
        assert fresh.mode == "refresh" and fresh.passes <= 9 and fresh.certificate is not None
        assert c.rel(fresh.model, ref) <= 0.05, (ratio, c.rel(fresh.model, ref))


def test_refresh_certifies_with_enough_passes(digits):
    ds = digits.ds
    f, r = digits.split(0.3)
    res = mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn, mode="refresh",
                     retain=(ds.X_train[r], ds.y_train[r]), max_passes=60, tol=1e-5)
    assert res.verified and res.certificate <= 1e-5
    assert digits.rel(res.model, digits.reference(0.3, r)) <= 0.01


def test_auto_mode_on_converged_training(digits):
    ds = digits.ds
    f, r = digits.split(0.1)
    assert mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn).mode == "oneshot"
    res = mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn,
                     retain=(ds.X_train[r], ds.y_train[r]))
    assert res.mode == "refresh"


def test_exact_curvature_oneshot_is_newton(digits):
    c = Converged("digits", curvature="exact", fmt="fp32")
    for ratio in RATIOS:
        f, r = c.split(ratio)
        res = mu.unlearn(c.model, c.log, indices=f, loss_fn=loss_fn, mode="oneshot")
        assert c.rel(res.model, digits.reference(ratio, r)) <= 0.05


def test_class_removal(mnist):
    ds = mnist.ds
    f = torch.nonzero(ds.y_train == 3).view(-1)
    mask = torch.ones(ds.n_train, dtype=torch.bool)
    mask[f] = False
    ref = mnist.reference("class3", mask.nonzero().view(-1))
    res = mu.unlearn(mnist.model, mnist.log, indices=f, loss_fn=loss_fn, mode="oneshot")
    Xf, yf = ds.X_train[f], ds.y_train[f]
    assert acc(mnist.model, Xf, yf) - acc(ref, Xf, yf) > 0.05  # the class is really forgotten
    assert abs(acc(res.model, Xf, yf) - acc(ref, Xf, yf)) <= 0.05


def test_int8_and_fp32_logs_agree(digits):
    c32 = Converged("digits", fmt="fp32")
    for ratio in (0.1, 0.5):
        f, r = digits.split(ratio)
        ref = digits.reference(ratio, r)
        a = mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn, mode="oneshot")
        b = mu.unlearn(c32.model, c32.log, indices=f, loss_fn=loss_fn, mode="oneshot")
        assert abs(digits.rel(a.model, ref) - c32.rel(b.model, ref)) <= 0.02
    assert digits.log.nbytes() < c32.log.nbytes()


def test_saved_log_gives_identical_results(digits, tmp_path):
    f, _ = digits.split(0.1)
    digits.log.save(tmp_path / "log")
    loaded = mu.GradientLog.load(tmp_path / "log", model=digits.model)
    a = mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn, mode="oneshot")
    b = mu.unlearn(digits.model, loaded, indices=f, loss_fn=loss_fn, mode="oneshot",
                   train_data=(digits.ds.X_train, digits.ds.y_train))
    assert torch.equal(vec(a.model), vec(b.model))


def test_callers_model_untouched_and_in_place(digits):
    f, _ = digits.split(0.1)
    before = vec(digits.model).clone()
    res = mu.unlearn(digits.model, digits.log, indices=f, loss_fn=loss_fn, mode="oneshot")
    assert torch.equal(vec(digits.model), before) and res.model is not digits.model
    m = copy.deepcopy(digits.model)
    res2 = mu.unlearn(m, digits.log, indices=f, loss_fn=loss_fn, mode="oneshot", in_place=True)
    assert res2.model is m and torch.equal(vec(m), vec(res.model))


def _bad_inputs(c):
    ds = c.ds
    n = ds.n_train
    X, y = ds.X_train, ds.y_train
    other = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    return [
        (dict(indices=torch.tensor([], dtype=torch.long)), mu.ForgetSetError, "empty"),
        (dict(indices=torch.arange(n)), mu.ForgetSetError, "nothing would be retained"),
        (dict(indices=torch.tensor([0, n])), mu.ForgetSetError, "out of range"),
        (dict(indices=torch.tensor([-1])), mu.ForgetSetError, "out of range"),
        (dict(indices=torch.tensor([3, 3])), mu.ForgetSetError, "repeated"),
        (dict(indices=torch.tensor([0.5])), mu.ForgetSetError, "integer"),
        (dict(forget=(X[:0], y[:0])), mu.ForgetSetError, "empty"),
        (dict(forget=(X[:5], y[:4])), mu.ForgetSetError, "rows"),
        (dict(forget=(X[:5].long(), y[:5])), mu.ForgetSetError, "cannot run on the forget samples"),
        (dict(forget=(torch.full_like(X[:5], float("nan")), y[:5])), mu.ForgetSetError, "NaN"),
        (dict(forget=(X[:5, :10], y[:5])), mu.ForgetSetError, "cannot run"),
        (dict(indices=[1, 2], mode="refresh"), ValueError, "retained data"),
        (dict(indices=[1, 2], mode="sideways"), ValueError, "unknown mode"),
        (dict(indices=[1, 2], mode="trajectory"), ValueError, "checkpoints"),
        (dict(indices=[1, 2], method="magic"), ValueError, "unknown method"),
        (dict(indices=[1, 2], model=other), mu.LogMismatchError, None),
    ]


def test_bad_input_raises_typed_errors_and_leaves_model(digits):
    before = vec(digits.model).clone()
    for kwargs, exc, match in _bad_inputs(digits):
        model = kwargs.pop("model", digits.model)
        with pytest.raises(exc, match=match):
            mu.unlearn(model, digits.log, loss_fn=loss_fn, **kwargs)
        assert torch.equal(vec(digits.model), before)


def test_model_moved_away_from_anchor_is_rejected(digits):
    m = copy.deepcopy(digits.model)
    with torch.no_grad():
        m.weight.add_(0.1)
    with pytest.raises(mu.LogMismatchError, match="anchor"):
        mu.unlearn(m, digits.log, indices=[1, 2], loss_fn=loss_fn)


def test_failed_line_search_leaves_model_untouched(digits):
    ds = digits.ds
    f, r = digits.split(0.1)
    calls = {"n": 0}

    def liar(out, y):  # the retained loss grows with every call: no step can ever decrease it
        calls["n"] += 1
        return loss_fn(out, y) + 1e3 * calls["n"]

    before = vec(digits.model).clone()
    with pytest.raises(mu.LineSearchError, match="halvings"):
        mu.unlearn(digits.model, digits.log, indices=f, loss_fn=liar, mode="refresh",
                   retain=(ds.X_train[r], ds.y_train[r]), max_passes=100)
    assert torch.equal(vec(digits.model), before)


def test_nonfinite_gradient_is_reported(digits):
    def nan_loss(out, y):
        return loss_fn(out, y) * float("nan")

    with pytest.raises(mu.NonFiniteError):
        mu.unlearn(digits.model, digits.log, indices=[1, 2], loss_fn=nan_loss, mode="oneshot")


def test_oneshot_pcg_solve_matches_the_eigenbasis_solve(mnist):
    from mini_unlearn.curvature import Layout
    from mini_unlearn.methods.mini import forget_pass, kron_pcg, preconditioner

    log, model = mnist.log, copy.deepcopy(mnist.model)
    layout = Layout(log.param_names, log.shapes)
    f, _ = mnist.split(0.3)
    n, r, lam = log.meta["n_train"], len(f), log.meta["weight_decay"]
    w_a = log.get("anchor/w")
    fs = forget_pass(model, layout, log, w_a, (mnist.ds.X_train[f], mnist.ds.y_train[f]), loss_fn,
                     curvature=True, batch_size=512, device=None)
    g0 = (n * log.get("anchor/g") - fs.grad) / (n - r) + lam * w_a
    by_cg = kron_pcg(log, layout, fs, n, r, lam, g0, None)
    by_eig = preconditioner(log, layout, fs, n, r, lam, None).solve(g0)
    assert by_cg is not None
    assert float((by_cg - by_eig).norm() / by_eig.norm()) < 1e-3
