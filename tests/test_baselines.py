"""Baselines (docs/math.md): retrain, finetune, NegGrad+ and ∇τ through ``mu.unlearn`` on
digits with the MLP recipe: retraining reproduces ``models.train`` exactly, the approximate
methods move the forget accuracy toward the retrained model's, ∇τ's schedule follows §2.4,
missing inputs raise, and the caller's model is never modified."""
import math

import pytest
import torch

from conftest import vec
from torch.utils.data import DataLoader, TensorDataset

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import class_split, forget_split, load_dataset
from mini_unlearn.methods import METHODS
from mini_unlearn.methods.nabla_tau import alpha_schedule, num_epochs

loss_fn = M.loss_fn
APPROX = ("finetune", "neggrad", "nabla_tau")


pytestmark = pytest.mark.usefixtures("one_thread")




def acc(m, data):
    with torch.no_grad():
        return float((m(data[0]).argmax(1) == data[1]).float().mean())


class Setup:
    """An MLP trained by SGD on digits, its log, a validation/test split of the test set."""

    def __init__(self):
        self.ds = ds = load_dataset("digits", seed=0, preprocess="unit")
        self.X, self.y = ds.X_train, ds.y_train
        # The default MLP recipe at lr 0.5: at 0.1 the [0, 1]-scaled digits underfit (93% train
        # accuracy), leaving no train/test gap for unlearning to close.
        self.recipe = M.default_recipe("mlp")
        self.recipe.lr = 0.5
        self.model = self.make()
        M.train(self.model, self.X, self.y, self.recipe)
        self.log = mu.Recorder(self.model, checkpoints=0).finalize(
            (self.X, self.y), loss_fn, weight_decay=self.recipe.weight_decay, progress=False)
        perm = torch.randperm(ds.n_test, generator=torch.Generator().manual_seed(0))
        half = ds.n_test // 2
        self.val = (ds.X_test[perm[:half]], ds.y_test[perm[:half]])
        self.test = (ds.X_test[perm[half:]], ds.y_test[perm[half:]])
        self.w0 = vec(self.model).clone()
        self._ref = {}

    def make(self):
        return M.make_model("mlp", self.ds.num_features, self.ds.num_classes, seed=0)

    def data(self, idx):
        return self.X[idx], self.y[idx]

    def run(self, method, f, r, **kw):
        if method == "retrain":
            kw = dict(recipe=self.recipe, make_model=self.make, **kw)
        elif method == "nabla_tau":
            kw = dict(val=self.val, **kw)
        else:
            kw = dict(recipe=self.recipe, **kw)
        return mu.unlearn(self.model, self.log, indices=f, loss_fn=loss_fn, method=method,
                          retain=self.data(r), **kw)

    def reference(self, key, f, r):
        if key not in self._ref:
            self._ref[key] = self.run("retrain", f, r).model
        return self._ref[key]

    def unchanged(self):
        return torch.equal(vec(self.model), self.w0)


@pytest.fixture(scope="module")
def s():
    return Setup()


def test_registered():
    for name in ("retrain", "finetune", "neggrad", "nabla_tau"):
        assert name in METHODS


def test_retrain_reproduces_models_train(s):
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    ref = s.make()
    M.train(ref, s.X, s.y, s.recipe, indices=r)
    res = mu.unlearn(s.model, s.log, indices=f, loss_fn=loss_fn, method="retrain", recipe=s.recipe,
                     make_model=s.make, train_data=(s.X, s.y), retain_indices=r)
    assert torch.equal(vec(res.model), vec(ref))
    n_ret = s.ds.n_train - f.numel()
    assert (res.method, res.passes, res.grad_evals) == ("retrain", s.recipe.epochs, n_ret * s.recipe.epochs)
    assert res.certificate is None and not res.verified and res.info["epochs"] == s.recipe.epochs
    # retain_indices and train_data default to the complement of indices= and the log's data.
    res2 = mu.unlearn(s.model, s.log, indices=f, loss_fn=loss_fn, method="retrain", recipe=s.recipe,
                      make_model=s.make)
    assert torch.equal(vec(res2.model), vec(ref))
    assert s.unchanged()


def test_retrain_missing_or_wrong_inputs(s):
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    base = dict(loss_fn=loss_fn, method="retrain")
    cases = [
        dict(indices=f, make_model=s.make),  # no recipe
        dict(indices=f, recipe=s.recipe),  # no make_model
        dict(forget=s.data(f), recipe=s.recipe, make_model=s.make),  # no retained rows
        dict(indices=f, recipe=s.recipe, make_model=s.make, retain_indices=r[1:]),  # too few
        dict(indices=f, recipe=s.recipe, make_model=s.make, retain_indices=torch.cat([r[1:], f[:1]])),
        dict(indices=f, recipe=s.recipe, make_model=lambda: M.make_model("logreg", 64, 10)),
    ]
    for kw in cases:
        with pytest.raises(ValueError):
            mu.unlearn(s.model, s.log, **base, **kw)
    assert s.unchanged()


def test_nabla_tau_schedule_matches_design():
    # E = floor(6 N_r / (2 N_f)), capped at 80, at least 1.
    assert num_epochs(21, 3) == 21
    assert num_epochs(16, 7) == 6  # floor(96 / 14)
    assert num_epochs(23, 3) == 23
    assert num_epochs(27, 1) == 80 and num_epochs(1000, 1) == 80
    assert num_epochs(1, 10) == 1  # floor(0.3) = 0 -> at least one epoch
    # alpha_0 = 5/3 r/n, minus alpha_0/E after every epoch: 0 after the last one.
    r, n, E = 144, 1437, 21
    a = alpha_schedule(r, n, E)
    a0 = 5 / 3 * r / n
    assert len(a) == E and a[0] == pytest.approx(a0, rel=1e-12)
    assert all(x - y == pytest.approx(a0 / E, rel=1e-9) for x, y in zip(a, a[1:]))
    assert a[-1] - a0 / E == pytest.approx(0.0, abs=1e-15)
    assert alpha_schedule(300, 1000, 4) == pytest.approx([0.5, 0.375, 0.25, 0.125])
    assert alpha_schedule(900, 1000, 2) == pytest.approx([1.0, 0.5])  # α0 clamped to 1
    for bad in ((0, 10, 3), (10, 10, 3), (1, 10, 0)):
        with pytest.raises(ValueError):
            alpha_schedule(*bad)
    with pytest.raises(ValueError):
        num_epochs(0, 3)


def test_nabla_tau_run_follows_schedule(s):
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    res = s.run("nabla_tau", f, r)
    n_f, n_r = math.ceil(f.numel() / 64), math.ceil(r.numel() / 64)
    E = num_epochs(n_r, n_f)
    assert (n_f, n_r, E) == (3, 21, 21)
    info = res.info
    assert res.passes == E == info["epochs"] and info["steps"] == E * n_f
    assert info["alpha0"] == pytest.approx(5 / 3 * f.numel() / s.ds.n_train)
    assert len(info["val_losses"]) == math.ceil(E / 5)  # at the start, then every 5 epochs
    # E·N_f = 63 retain batches = exactly 3 retain passes.
    assert res.grad_evals == E * f.numel() + 3 * r.numel()
    assert res.certificate is None and not res.verified
    assert s.unchanged()


@pytest.mark.parametrize("method", APPROX)
def test_missing_retain_or_val_raises(s, method):
    f, _ = forget_split(s.ds.n_train, 0.1, seed=1)
    kw = dict(val=s.val) if method == "nabla_tau" else {}
    with pytest.raises(ValueError, match="retain"):
        mu.unlearn(s.model, s.log, indices=f, loss_fn=loss_fn, method=method, **kw)
    if method == "nabla_tau":
        with pytest.raises(ValueError, match="val"):
            mu.unlearn(s.model, s.log, indices=f, loss_fn=loss_fn, method=method,
                       retain=s.data(torch.arange(10)))
    assert s.unchanged()


@pytest.mark.parametrize("method", APPROX)
def test_forgetting_a_class_moves_toward_retraining(s, method):
    f, r = class_split(s.y, 3)
    ref = s.reference("class3", f, r)
    fd, rd = s.data(f), s.data(r)
    a_orig, a_ref = acc(s.model, fd), acc(ref, fd)
    assert a_orig > 0.95 and a_ref < 0.05
    res = s.run(method, f, r)
    a_u = acc(res.model, fd)
    assert a_u < a_orig - 0.05, (method, a_orig, a_u, a_ref)
    if method == "neggrad":
        assert a_u < 0.6
    assert acc(res.model, rd) >= acc(s.model, rd) - 0.02  # retained knowledge kept
    assert res.certificate is None and not res.verified and res.grad_evals > 0
    assert s.unchanged()


@pytest.mark.parametrize("method", APPROX)
def test_random_forget_tracks_retraining(s, method):
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    ref = s.reference("rand10", f, r)
    fd = s.data(f)
    res = s.run(method, f, r)
    gap_orig = abs(acc(s.model, fd) - acc(ref, fd))
    gap_u = abs(acc(res.model, fd) - acc(ref, fd))
    assert gap_u <= gap_orig + 1.0 / f.numel() + 1e-9, (method, gap_orig, gap_u)  # one sample of slack
    assert abs(acc(res.model, s.test) - acc(ref, s.test)) <= 0.02
    assert s.unchanged()


def test_finetune_and_neggrad_defaults_and_data_forms(s):
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    res = s.run("finetune", f, r)
    # 10% of 20 epochs -> 2, at the recipe's last-epoch lr, λ of the log.
    assert res.passes == res.info["epochs"] == 2
    assert res.info["lr"] == pytest.approx(M.lr_at_epoch(s.recipe, s.recipe.epochs - 1))
    assert res.info["weight_decay"] == s.recipe.weight_decay
    assert res.grad_evals == 2 * r.numel()
    again = s.run("finetune", f, r)
    assert torch.equal(vec(res.model), vec(again.model))  # seeded batch order
    ng = s.run("neggrad", f, r, epochs=1, beta=0.9)
    n_r = math.ceil(r.numel() / 64)  # one retain pass, each batch with a forget batch (cycled)
    assert ng.passes == 1 and ng.info["beta"] == 0.9
    assert ng.grad_evals == r.numel() + sum(([64, 64, 16] * n_r)[:n_r])
    with pytest.raises(ValueError):
        s.run("neggrad", f, r, beta=1.5)
    # retain as a Dataset or a DataLoader
    Xr, yr = s.data(r)
    for retain in (TensorDataset(Xr, yr), DataLoader(TensorDataset(Xr, yr), batch_size=100, shuffle=True)):
        out = mu.unlearn(s.model, s.log, indices=f, loss_fn=loss_fn, method="finetune", retain=retain,
                         epochs=1)
        assert out.grad_evals == r.numel() and not torch.equal(vec(out.model), s.w0)
    assert s.unchanged()


def test_in_place_writes_the_result(s):
    import copy
    model = copy.deepcopy(s.model)
    f, r = forget_split(s.ds.n_train, 0.1, seed=1)
    res = mu.unlearn(model, s.log, indices=f, loss_fn=loss_fn, method="finetune", retain=s.data(r),
                     epochs=1, in_place=True)
    assert res.model is model and not torch.equal(vec(model), s.w0)
