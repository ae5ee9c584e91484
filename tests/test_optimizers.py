"""Optimizer-aware recording (Recorder.attach): SGD with momentum / Nesterov, Adam and AdamW on a
mnist5k MLP against same-recipe retraining; what is refused; AMP, clipping, accumulation; memory."""
import copy

import pytest
import torch

from conftest import acc, vec

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.errors import CurvatureScaleError, UnsupportedTrainingError

EPOCHS, BS = 6, 64


def _loop(model, opt, X, y, *, seed, keep=None, sched=None, clip=None, epochs=EPOCHS):
    """The same batch sequence for training and retraining (forgotten rows dropped)."""
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    for _ in range(epochs):
        for b in torch.randperm(n, generator=g).split(BS):
            if keep is not None:
                b = b[keep[b]]
                if b.numel() == 0:
                    continue
            opt.zero_grad()
            M.loss_fn(model(X[b]), y[b]).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        if sched is not None:
            sched.step()


RECIPES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3),
}


class Run:
    def __init__(self, ds, name, ratio=0.1):
        self.ds = ds
        X, y = ds.X_train, ds.y_train
        self.model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
        opt = RECIPES[name](self.model.parameters())
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        rec = mu.Recorder(self.model, checkpoints=10).attach(opt)
        _loop(self.model, opt, X, y, seed=0, sched=sched)
        self.log = rec.finalize((X, y), M.loss_fn, progress=False)
        self.f, r = forget_split(ds.n_train, ratio, seed=1)
        keep = torch.ones(ds.n_train, dtype=torch.bool)
        keep[self.f] = False
        self.ref = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
        opt = RECIPES[name](self.ref.parameters())
        _loop(self.ref, opt, X, y, seed=0, keep=keep, sched=torch.optim.lr_scheduler.StepLR(opt, 4, 0.5))
        self.res = mu.unlearn(self.model, self.log, indices=self.f, loss_fn=M.loss_fn)

    def rel(self, model=None):
        m = self.res.model if model is None else model
        return float((vec(m) - vec(self.ref)).norm() / (vec(self.model) - vec(self.ref)).norm())


@pytest.fixture(scope="module")
def ds():
    return load_dataset("mnist5k", seed=0, preprocess="unit")


@pytest.fixture(scope="module")
def runs(ds):
    return {name: Run(ds, name) for name in ("sgd", "momentum")}


@pytest.fixture(scope="module")
def adamw_log(ds):
    """An AdamW run's log (recording works; the trajectory refuses it, see below)."""
    X, y = ds.X_train[:1000], ds.y_train[:1000]
    model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    opt = RECIPES["adamw"](model.parameters())
    rec = mu.Recorder(model, checkpoints=4).attach(opt)
    _loop(model, opt, X, y, seed=0, epochs=2)
    return model, rec.finalize((X, y), M.loss_fn, progress=False), (X, y)


def test_adamw_trajectory_is_refused_not_approximated(adamw_log):
    model, log, (X, y) = adamw_log
    before = vec(model).clone()
    with pytest.raises(UnsupportedTrainingError, match="AdamW"):
        mu.unlearn(model, log, forget=(X[:50], y[:50]), loss_fn=M.loss_fn)
    assert torch.equal(vec(model), before)


@pytest.mark.parametrize("name", ["momentum"])
def test_momentum_reaches_plain_sgd_fidelity(runs, name):
    base, run = runs["sgd"], runs[name]
    assert run.res.mode == "trajectory" and 5 <= run.res.passes <= 10  # K = 10, total_steps unknown
    assert run.rel() <= base.rel() + 0.1, (name, run.rel(), base.rel())
    assert run.rel() < 0.9  # and it moved: the no-op and the 14% of old were rel 1.0 / 0.90
    Xf, yf = run.ds.X_train[run.f], run.ds.y_train[run.f]
    gap_u = abs(acc(run.res.model, Xf, yf) - acc(run.ref, Xf, yf))
    gap_o = abs(acc(run.model, Xf, yf) - acc(run.ref, Xf, yf))
    assert gap_u <= gap_o + 1.0 / len(run.f), (name, gap_u, gap_o)
    st = run.res.info["stability"]
    assert st["max_rho"] < 1 and st["clipped"] == 0


def test_log_records_the_optimizer(runs, adamw_log):
    log = adamw_log[1]
    meta = log.meta
    assert meta["optimizer"]["name"] == "AdamW" and meta["optimizer"]["preconditioned"]
    assert "ckpt/d" in log.row_lists and "ckpt/d" not in runs["momentum"].log.row_lists
    eta, mu_, c, lam, lam_dec, nesterov, steps = meta["segments"][0]["groups"][0][0]
    assert mu_ == 0.9 and lam == 0.0 and lam_dec > 0  # AdamW: decay is decoupled
    assert eta > 1e-3  # the first steps' bias correction 1/(1 − β₁ᵗ) is folded in
    assert sum(s["steps"] for s in meta["segments"]) == meta["steps_recorded"] == 2 * 16
    m = runs["momentum"].log.meta["segments"][-1]["groups"][0][-1]
    assert m[1] == 0.9 and m[3] == 1e-3 and m[4] == 0.0
    assert sum(s["steps"] for s in runs["momentum"].log.meta["segments"]) == EPOCHS * 63


def _tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.RMSprop(p, lr=1e-2),
    lambda p: torch.optim.LBFGS(p),
    lambda p: torch.optim.Adam(p, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.1, maximize=True),
])
def test_unsupported_optimizers_are_refused(make):
    model = _tiny()
    with pytest.raises(UnsupportedTrainingError):
        mu.Recorder(model).attach(make(model.parameters()))


def test_closure_steps_are_refused():
    model = _tiny()
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mu.Recorder(model).attach(opt)

    def closure():
        opt.zero_grad()
        loss = M.loss_fn(model(X), y)
        loss.backward()
        return loss

    with pytest.raises(UnsupportedTrainingError, match="closure"):
        opt.step(closure)


def test_uncovered_parameters_are_refused():
    model = _tiny()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(UnsupportedTrainingError, match="not optimised"):
        mu.Recorder(model).attach(opt)


def test_weight_and_bias_in_different_groups_are_refused():
    model = _tiny()
    X, y = _data()
    opt = torch.optim.SGD([{"params": [model[0].weight, model[2].weight], "weight_decay": 1e-2},
                           {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}], lr=0.1)
    rec = mu.Recorder(model, checkpoints=2).attach(opt)
    for _ in range(4):
        opt.zero_grad()
        M.loss_fn(model(X), y).backward()
        opt.step()
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    before = vec(model).clone()
    with pytest.raises(UnsupportedTrainingError, match="weight and bias"):
        mu.unlearn(model, log, forget=(X[:5], y[:5]), loss_fn=M.loss_fn)
    assert torch.equal(vec(model), before)


def test_forced_instability_raises_and_leaves_the_model_untouched():
    model = _tiny()
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rec = mu.Recorder(model, checkpoints=2).attach(opt)
    for _ in range(6):
        opt.zero_grad()
        M.loss_fn(model(X), y).backward()
        opt.step()
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    for k in [k for k in log.entry_names if k.endswith("/s_A")]:  # a curvature 1000x too large
        log.put(k, log.get(k) * 1000, exact=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CurvatureScaleError, match="diverged"):
        mu.unlearn(model, log, forget=(X[:10], y[:10]), loss_fn=M.loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = mu.unlearn(model, log, forget=(X[:10], y[:10]), loss_fn=M.loss_fn, unstable="clip")
    assert res.info["stability"]["clipped"] > 0 and torch.isfinite(vec(res.model)).all()


def test_amp_gradscaler_records_unscaled_gradients_and_skips_overflow():
    """GradScaler: the hook sees the unscaled gradient; an overflowing step is not recorded."""
    model = _tiny()
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    rec = mu.Recorder(model, checkpoints=1, total_steps=3, compression="fp32").attach(opt)
    grads = []
    for t in range(3):
        opt.zero_grad()
        loss = M.loss_fn(model(X), y)
        if t == 1:
            loss = loss * float("inf")  # this step overflows: GradScaler skips it
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if t != 1:
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        scaler.step(opt)
        scaler.update()
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    assert rec.steps == 2 and log.meta["segments"][0]["steps"] == 2
    mean = (grads[0] + grads[1]) / 2
    got = log.row("ckpt/grad", 0)
    assert torch.allclose(got, mean, atol=1e-6)  # unscaled: the scaled one is 65,536x larger


def test_clipping_and_accumulation_record_what_the_step_used():
    model = _tiny()
    X, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = mu.Recorder(model, checkpoints=1, compression="fp32").attach(opt)
    used = []
    for t in range(2):
        opt.zero_grad()
        # two micro-batches accumulate into one optimizer step, clipped before it
        M.loss_fn(model(X[:48]), y[:48]).backward()
        (M.loss_fn(model(X[48:]), y[48:])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        used.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        opt.step()
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    assert rec.steps == 2
    assert torch.allclose(log.row("ckpt/grad", 0), (used[0] + used[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("total_steps", [None, 300])
def test_recorder_device_memory_is_bounded(tmp_path, total_steps):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = mu.Recorder(model, checkpoints=10, total_steps=total_steps, spill_dir=tmp_path).attach(opt)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    for t in range(300):
        opt.zero_grad()
        b = torch.arange(t % 4 * 64, t % 4 * 64 + 64)
        M.loss_fn(model(X[b]), y[b]).backward()
        opt.step()
        assert rec.device_bytes() <= 3 * model_bytes
    assert rec.peak_device_bytes <= 3.6 * model_bytes  # transiently: the open sums + one compression
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    assert len(log.meta["segments"]) <= 10 and sum(s["steps"] for s in log.meta["segments"]) == 300


def _digits_momentum_log(schedule, checkpoints):
    """A digits MLP trained 2 epochs by SGD-momentum under ``schedule(opt, steps)``, recorded."""
    ds = load_dataset("digits", seed=0)
    model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = 2 * -(-ds.n_train // 64)
    sched = schedule(opt, steps)
    g = torch.Generator().manual_seed(0)
    rec = mu.Recorder(model, checkpoints=checkpoints(steps), total_steps=steps).attach(opt)
    for _ in range(2):
        for b in torch.randperm(ds.n_train, generator=g).split(64):
            opt.zero_grad()
            M.loss_fn(model(ds.X_train[b]), ds.y_train[b]).backward()
            opt.step()
            sched.step()
    return ds, model, rec.finalize((ds.X_train, ds.y_train), M.loss_fn, progress=False)


def test_warmup_from_zero_learning_rate_runs_with_fine_checkpoints():
    """A warm-up's first step has lr 0; with checkpoints fine enough that it is a run of its own, the
    calibrated trajectory's critical-damping curvature must not divide by η = 0 (it raised
    ZeroDivisionError): the curvature does not enter a zero step."""
    ds, model, log = _digits_momentum_log(
        lambda opt, steps: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 20)),
        lambda steps: steps // 2)
    f, _ = forget_split(ds.n_train, 0.1, seed=1)
    res = mu.unlearn(model, log, indices=f, loss_fn=M.loss_fn, mode="trajectory", progress=False)
    assert torch.isfinite(vec(res.model)).all() and res.info["stability"]["max_rho"] <= 1.0 + 1e-6


def test_retained_repair_at_a_decayed_learning_rate_warns():
    """The repair steps at the recorded final rule; after a schedule decayed to ~0 (cosine) that is
    a no-op, which it says instead of silently returning the trajectory's answer as 'repaired'."""
    ds, model, log = _digits_momentum_log(
        lambda opt, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps), lambda steps: 4)
    f, r = forget_split(ds.n_train, 0.1, seed=1)
    kw = dict(indices=f, loss_fn=M.loss_fn, mode="trajectory", progress=False,
              retain=(ds.X_train[r], ds.y_train[r]), repair_epochs=1)
    with pytest.warns(UserWarning, match="barely move the model"):
        mu.unlearn(model, log, **kw)
