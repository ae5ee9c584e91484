"""Trajectory mode (docs/math.md, issue 4): SGD-trained models on MNIST-5k against retraining with
the same recipe, initialisation and batch sequence minus the forget samples."""
import pytest
import torch

from conftest import acc, vec

import mini_unlearn as mu
from mini_unlearn import models as M
from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.methods import mini

RATIOS = (0.01, 0.1, 0.3, 0.5)






class SgdRun:
    def __init__(self, kind, K=10):
        self.ds = ds = load_dataset("mnist5k", seed=0, preprocess="unit")
        self.kind = kind
        self.recipe = M.default_recipe(kind, "sgd")
        if kind == "logreg":
            self.recipe.weight_decay = 1e-3
        self.model = self.fresh()
        steps = len(M.batch_schedule(ds.n_train, self.recipe))
        rec = mu.Recorder(self.model, checkpoints=K, total_steps=steps)
        self.train_stats = M.train(self.model, ds.X_train, ds.y_train, self.recipe, step_callback=rec.step)
        self.log = rec.finalize((ds.X_train, ds.y_train), M.loss_fn, weight_decay=self.recipe.weight_decay,
                                progress=False)

    def fresh(self):
        return M.make_model(self.kind, self.ds.num_features, self.ds.num_classes, seed=0)

    def retrain(self, retain_idx):
        m = self.fresh()
        M.train(m, self.ds.X_train, self.ds.y_train, self.recipe, indices=retain_idx)
        return m


_RUNS: dict = {}


def sgd_run(kind: str) -> SgdRun:
    """One recorded training run per model kind, shared by the tests of this module."""
    if kind not in _RUNS:
        _RUNS[kind] = SgdRun(kind)
    return _RUNS[kind]


@pytest.mark.parametrize("kind,bound,acc_gap", [("logreg", 0.5, 0.01), ("mlp", 0.85, 0.03)])
def test_trajectory_tracks_same_recipe_retraining(kind, bound, acc_gap):
    run = sgd_run(kind)
    ds = run.ds
    assert run.log.meta["modes"] == ["oneshot", "refresh", "trajectory"]
    assert len(run.log.meta["segments"]) == 10
    for ratio in RATIOS:
        f, r = forget_split(ds.n_train, ratio, seed=1)
        ref = run.retrain(r)
        res = mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn)  # auto -> trajectory
        assert res.mode == "trajectory" and res.passes == 10
        rel = float((vec(res.model) - vec(ref)).norm() / (vec(run.model) - vec(ref)).norm())
        assert rel <= bound, (kind, ratio, rel)
        assert abs(acc(res.model, ds.X_test, ds.y_test) - acc(ref, ds.X_test, ds.y_test)) <= acc_gap + 1e-6
        Xf, yf = ds.X_train[f], ds.y_train[f]
        # forget accuracy moves from the original's toward retraining's (up to one sample's flip)
        gap_u, gap_o = abs(acc(res.model, Xf, yf) - acc(ref, Xf, yf)), abs(acc(run.model, Xf, yf) - acc(ref, Xf, yf))
        assert gap_u <= gap_o + 1.0 / len(f) + 1e-6, (ratio, gap_u, gap_o)
        retrain_evals = run.recipe.epochs * len(r)
        # K forget passes, plus the directional calibration's Jacobian products (at most
        # CALIBRATION_SAMPLES rows per half and direction: each K-FAC block, and their sum)
        calib = res.info["stability"]["calibration"]
        assert calib["grad_evals"] <= 2 * mini.CALIBRATION_SAMPLES * (len(run.log.meta["kron_blocks"]) + 1)
        assert res.grad_evals - calib["grad_evals"] <= (0.5 if ratio == 0.5 else 0.05 if ratio == 0.01 else 1.0) * retrain_evals


def test_recorder_thins_segments_when_steps_are_unknown():
    model = torch.nn.Linear(5, 3)
    rec = mu.Recorder(model, checkpoints=4)
    X, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    for t in range(37):
        model.zero_grad()
        M.loss_fn(model(X[t % 40:t % 40 + 1]), y[t % 40:t % 40 + 1]).backward()
        rec.step(lr=0.1 if t < 20 else 0.05)
    log = rec.finalize((X, y), M.loss_fn, weight_decay=1e-3, progress=False)
    segs = log.meta["segments"]
    assert 2 <= len(segs) <= 4
    assert sum(s["steps"] for s in segs) == 37
    assert sum(n for s in segs for _, n in s["lr_runs"]) == 37
    lrs = {lr for s in segs for lr, _ in s["lr_runs"]}
    assert lrs == {0.1, 0.05}


def test_step_before_backward_is_an_error():
    model = torch.nn.Linear(5, 3)
    rec = mu.Recorder(model, checkpoints=2)
    with pytest.raises(RuntimeError, match="backward"):
        rec.step(lr=0.1)


def test_segment_spectra_are_stored_and_used():
    from mini_unlearn.data import load_dataset as load

    ds = load("digits", seed=0)
    recipe = M.default_recipe("mlp")
    recipe.epochs = 3
    model = M.make_model("mlp", ds.num_features, ds.num_classes, seed=0)
    rec = mu.Recorder(model, checkpoints=3, total_steps=len(M.batch_schedule(ds.n_train, recipe)))
    M.train(model, ds.X_train, ds.y_train, recipe, step_callback=rec.step)
    data = (ds.X_train, ds.y_train)
    plain = rec.finalize(data, M.loss_fn, weight_decay=recipe.weight_decay, progress=False)
    seg = rec.finalize(data, M.loss_fn, weight_decay=recipe.weight_decay, progress=False, segment_spectra=500)
    assert seg.meta["segment_spectra"] == 500 and "seg/0/0/s_A" in seg
    # spectra at the first segment's weights differ from the final ones, and change the result
    assert not torch.allclose(seg.get("seg/0/2/s_G"), seg.get("kfac/2/s_G"))
    f = torch.arange(0, 100)
    a = mu.unlearn(model, plain, indices=f, loss_fn=M.loss_fn, mode="trajectory")
    b = mu.unlearn(model, seg, indices=f, loss_fn=M.loss_fn, mode="trajectory")
    assert not torch.equal(vec(a.model), vec(b.model))
    assert torch.equal(vec(model), vec(rec.model))  # finalize restored the trained weights


def test_default_at_half_the_data_and_the_retained_repair():
    """Issue 10: the default (auto -> calibrated trajectory, forget-only) lands within 1.5 points
    of retraining's forget accuracy at 50 %, and its test accuracy is no further from
    retraining's than the original model's; ``retain=`` alone adds no repair (measured no closer
    with the directional calibration); ``repair_epochs=2`` runs two retained epochs at the
    recorded final step rule, counted in passes and grad_evals."""
    run = sgd_run("mlp")
    ds = run.ds
    assert run.log.meta["batch_size"] == run.recipe.batch_size
    f, r = forget_split(ds.n_train, 0.5, seed=1)
    ref = run.retrain(r)
    retain = (ds.X_train[r], ds.y_train[r])
    res = mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn)
    calib = res.info["stability"]["calibration"]
    assert res.mode == "trajectory" and res.passes == 10
    assert res.grad_evals == 10 * len(f) + calib["grad_evals"]
    Xf, yf = ds.X_train[f], ds.y_train[f]
    a = {k: (acc(m, Xf, yf), acc(m, ds.X_test, ds.y_test)) for k, m in
         (("orig", run.model), ("u", res.model), ("R", ref))}
    assert abs(a["u"][0] - a["R"][0]) <= 0.015, a
    assert abs(a["u"][1] - a["R"][1]) <= abs(a["orig"][1] - a["R"][1]) + 1e-6, a
    same = mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn, retain=retain)
    assert same.passes == 10 and "repair" not in same.info
    assert torch.equal(vec(same.model), vec(res.model))
    rep = mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn, retain=retain, repair_epochs=2)
    assert rep.passes == 10 + 2 and rep.info["repair"]["batch_size"] == run.recipe.batch_size
    assert rep.grad_evals == 10 * len(f) + 2 * len(r) + calib["grad_evals"]
    assert torch.isfinite(vec(rep.model)).all()
    with pytest.raises(ValueError, match="retain"):  # the repair needs the retained data
        mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn, repair_epochs=1)


class _NoForwardAD(torch.autograd.Function):
    """ReLU with a backward but no forward derivative (no jvp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class _Act(torch.nn.Module):
    def forward(self, x):
        return _NoForwardAD.apply(x)


def test_calibration_reports_alpha_and_refuses_a_layer_without_forward_derivative():
    """The calibration's α per K-FAC block is reported; a model whose forward has no forward-mode
    derivative makes the default trajectory raise UnsupportedTrainingError naming calibrate=False
    (which then runs), with the caller's model untouched."""
    run = sgd_run("mlp")
    f, _ = forget_split(run.ds.n_train, 0.3, seed=1)
    res = mu.unlearn(run.model, run.log, indices=f, loss_fn=M.loss_fn)
    alpha = res.info["stability"]["calibration"]["alpha"]
    assert set(alpha) == {b["module"] for b in run.log.meta["kron_blocks"]}
    assert all(mini.ALPHA_RANGE[0] <= a <= mini.ALPHA_RANGE[1] for a in alpha.values())
    torch.manual_seed(0)
    X, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), _Act(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = mu.Recorder(model, checkpoints=2, total_steps=8).attach(opt)
    for s in range(8):
        idx = torch.arange(8 * s, 8 * s + 8)
        opt.zero_grad()
        M.loss_fn(model(X[idx]), y[idx]).backward()
        opt.step()
    log = rec.finalize((X, y), M.loss_fn, progress=False)
    before = vec(model).clone()
    with pytest.raises(mu.UnsupportedTrainingError, match="calibrate=False"):
        mu.unlearn(model, log, forget=(X[:16], y[:16]), loss_fn=M.loss_fn, mode="trajectory")
    assert torch.equal(vec(model), before)
    res = mu.unlearn(model, log, forget=(X[:16], y[:16]), loss_fn=M.loss_fn, mode="trajectory", calibrate=False,
                     linearity_limit=None)
    assert res.info["stability"]["calibration"] is None and torch.isfinite(vec(res.model)).all()


def test_calibration_rows_are_capped_by_output_positions():
    """A classifier's rows are single predictions (CALIBRATION_SAMPLES rows); a sequence row holds
    one per token, so fewer rows keep rows × positions within CALIBRATION_POSITIONS."""
    X = torch.zeros(600, 3)
    assert mini._calibration_rows((X, torch.zeros(600, dtype=torch.long)), None) == mini.CALIBRATION_SAMPLES
    tokens = torch.zeros(600, 64, dtype=torch.long)
    assert mini._calibration_rows((tokens, tokens), None) == mini.CALIBRATION_POSITIONS // 64
    long_rows = torch.zeros(10, 100_000, dtype=torch.long)
    assert mini._calibration_rows((long_rows, long_rows), None) == mini.CALIBRATION_MIN
