"""Models, recipes, schedules and training loops."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.models import (Recipe, batch_schedule, default_recipe, image_shape, loss_fn,
                                 lr_at_epoch, lr_at_step, make_model, make_optimizer, objective,
                                 objective_and_grad, retain_schedule, retain_schedule_with_steps,
                                 steps_per_epoch, train)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, preprocess="standardize")


def _acc(model, X, y):
    with torch.no_grad():
        return float((model(X.to(next(model.parameters()).dtype)).argmax(1) == y).float().mean())


def test_make_model_deterministic_and_rng_neutral():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = make_model("mlp", 64, 10, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)  # global RNG untouched
    b = make_model("mlp", 64, 10, seed=5)
    c = make_model("mlp", 64, 10, seed=6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    lin = make_model("logreg", 64, 10, seed=0)
    assert isinstance(lin, nn.Linear) and lin.bias is not None
    assert [p.shape for p in a.parameters()] == [(128, 64), (128,), (10, 128), (10,)]
    with pytest.raises(ValueError):
        make_model("transformer", 64, 10)


def test_default_recipes():
    r = default_recipe("logreg")
    assert r.name == "lbfgs" and r.weight_decay == 1e-2 and r.batch_size is None and r.tol <= 1e-6
    m = default_recipe("mlp")
    assert (m.name, m.weight_decay, m.batch_size, m.epochs, m.lr) == ("sgd", 1e-3, 64, 20, 0.1)
    assert lr_at_epoch(m, 0) == 0.1 and lr_at_epoch(m, 5) == pytest.approx(0.05)
    assert lr_at_epoch(m, 19) == pytest.approx(0.1 * 0.5 ** 3)
    assert default_recipe("logreg", "sgd").name == "sgd"
    with pytest.raises(ValueError):
        Recipe("adam", weight_decay=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lbfgs_logreg_converges(digits, dtype):
    model = make_model("logreg", digits.num_features, digits.num_classes, seed=0).to(dtype)
    recipe = default_recipe("logreg")
    _, g_init = objective_and_grad(model, digits.X_train, digits.y_train, recipe.weight_decay)
    stats = train(model, digits.X_train, digits.y_train, recipe)
    assert stats["converged"] and stats["steps"] > 0 and stats["seconds"] > 0
    assert all(p.dtype == dtype for p in model.parameters())
    # gradient of the regularised objective at the result, evaluated in float64
    m64 = copy.deepcopy(model).double()
    f, g = objective_and_grad(m64, digits.X_train.double(), digits.y_train, recipe.weight_decay)
    assert float(g.norm()) < 1e-6 * float(g_init.norm())
    assert f == pytest.approx(stats["final_loss"], rel=1e-5)
    assert f == pytest.approx(objective(m64, digits.X_train, digits.y_train, recipe.weight_decay))
    assert _acc(model, digits.X_test, digits.y_test) > 0.9


def test_lbfgs_retrain_on_indices(digits):
    recipe = default_recipe("logreg")
    forget, retain = forget_split(digits.n_train, 0.2, seed=0)
    a = make_model("logreg", digits.num_features, digits.num_classes, seed=0)
    train(a, digits.X_train, digits.y_train, recipe, indices=retain)
    _, g = objective_and_grad(a.double(), digits.X_train[retain].double(), digits.y_train[retain],
                              recipe.weight_decay)
    assert float(g.norm()) < 1e-5


def test_sgd_mlp_trains(digits):
    recipe = Recipe("sgd", weight_decay=1e-3, epochs=4, batch_size=64, lr=0.1, lr_decay_epochs=2,
                    gamma=0.5, seed=0)
    model = make_model("mlp", digits.num_features, digits.num_classes, seed=0)
    f0 = objective(model, digits.X_train, digits.y_train, recipe.weight_decay)
    stats = train(model, digits.X_train, digits.y_train, recipe)
    assert stats["steps"] == 4 * 23  # ceil(1437 / 64) = 23 per epoch
    assert stats["final_loss"] < 0.3 * f0
    assert _acc(model, digits.X_test, digits.y_test) > 0.9


def test_batch_schedule_seeded_and_complete():
    r = Recipe("sgd", weight_decay=0.0, epochs=3, batch_size=16, lr=0.1, seed=7)
    s = batch_schedule(100, r)
    assert len(s) == 3 * 7 and [b.numel() for b in s[:7]] == [16] * 6 + [4]
    for e in range(3):
        assert torch.equal(torch.sort(torch.cat(s[7 * e:7 * e + 7])).values, torch.arange(100))
    s2 = batch_schedule(100, r)
    assert all(torch.equal(a, b) for a, b in zip(s, s2))
    assert not torch.equal(s[0], batch_schedule(100, Recipe("sgd", 0.0, 3, 16, 0.1, seed=8))[0])
    full = batch_schedule(100, Recipe("sgd", 0.0, 2, None, 0.1))
    assert len(full) == 2 and torch.equal(full[0], torch.arange(100))


def test_retain_schedule_removes_exactly_the_forget_indices():
    r = Recipe("sgd", weight_decay=0.0, epochs=2, batch_size=8, lr=0.1, seed=0)
    s = batch_schedule(40, r)
    forget = torch.tensor([0, 3, 5, 17, 39])
    rs = retain_schedule(s, forget)
    assert len(rs) == len(s)
    for b, rb in zip(s, rs):
        expected = [int(i) for i in b if int(i) not in {0, 3, 5, 17, 39}]
        assert rb.tolist() == expected  # same order, only the forget indices gone
    # batches that become empty are dropped
    s_small = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 3])]
    assert [b.tolist() for b in retain_schedule(s_small, torch.tensor([3]))] == [[1, 2], [4]]


def test_step_callback_and_retraining_replays_schedule(digits):
    X, y = digits.X_train[:200], digits.y_train[:200]
    recipe = Recipe("sgd", weight_decay=1e-3, epochs=3, batch_size=32, lr=0.2, lr_decay_epochs=1,
                    gamma=0.5, seed=1)
    seen = []
    model = make_model("mlp", 64, 10, seed=0)

    batches = []

    def cb(lr, indices=None):
        seen.append((lr, all(p.grad is not None for p in model.parameters())))
        batches.append(indices)

    stats = train(model, X, y, recipe, step_callback=cb)
    assert len(seen) == stats["steps"] == 3 * 7
    assert [lr for lr, _ in seen] == pytest.approx([0.2] * 7 + [0.1] * 7 + [0.05] * 7)
    assert all(has_grad for _, has_grad in seen)
    # the callback gets each step's batch, in the training set's numbering
    assert [b.tolist() for b in batches] == [b.tolist() for b in batch_schedule(200, recipe)]

    # retraining with indices == manual SGD over retain_schedule (same order, forget removed)
    forget, retain = forget_split(200, 0.25, seed=0)
    a = make_model("mlp", 64, 10, seed=0)
    kept = []
    train(a, X, y, recipe, indices=retain, step_callback=lambda lr, indices=None: kept.append(indices))
    # when retraining, the batches are the original ones minus the forget rows (original numbering)
    assert [b.tolist() for b in kept] == [b.tolist() for b in retain_schedule(batch_schedule(200, recipe), forget)]
    b = make_model("mlp", 64, 10, seed=0)
    spe = 7
    sched = batch_schedule(200, recipe)
    for t, batch in enumerate(sched):
        keep = retain_schedule([batch], forget)
        if not keep:
            continue
        lr = lr_at_epoch(recipe, t // spe)
        b.zero_grad()
        loss = loss_fn(b(X[keep[0]]), y[keep[0]]) + 0.5 * recipe.weight_decay * sum(
            (p * p).sum() for p in b.parameters())
        loss.backward()
        with torch.no_grad():
            for p in b.parameters():
                p -= lr * p.grad
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_train_rejects_bad_input(digits):
    m = make_model("logreg", 64, 10)
    with pytest.raises(ValueError):
        train(m, digits.X_train, digits.y_train[:-1], default_recipe("logreg"))
    with pytest.raises(ValueError):
        train(m, digits.X_train, digits.y_train, default_recipe("logreg"), indices=torch.tensor([5000]))


# --------------------------------------------------------------------------- image models


@pytest.mark.parametrize("kind", ["cnn", "resnet"])
@pytest.mark.parametrize("d,shape", [(784, (1, 28, 28)), (3072, (3, 32, 32)), (64, (1, 8, 8))])
def test_image_models_shapes_and_determinism(kind, d, shape):
    assert image_shape(d) == shape
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = make_model(kind, d, 10, seed=3)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    b = make_model(kind, d, 10, seed=3)
    c = make_model(kind, d, 10, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    x = torch.rand(5, d)
    a.eval()
    out = a(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if kind == "resnet":
        torch.testing.assert_close(a(x.reshape(5, *shape)), out)  # images or flattened rows
        widths = [m.out_channels for m in a.modules() if isinstance(m, nn.Conv2d)]
        assert {16, 32, 64} <= set(widths) and isinstance(a.fc, nn.Linear) and a.fc.in_features == 64


def test_image_model_errors():
    with pytest.raises(ValueError, match="square image"):
        make_model("resnet", 100 * 3 + 1, 10)
    with pytest.raises(ValueError, match="does not hold"):
        make_model("cnn", 784, 10, input_shape=(3, 28, 28))
    with pytest.raises(TypeError, match="unknown option"):
        make_model("resnet", 784, 10, depth=20)
    with pytest.raises(TypeError):
        make_model("mlp", 784, 10, blocks=2)
    m = make_model("resnet", 784, 10, blocks=2)
    assert len([b for b in m.stages]) == 6
    assert make_model("cnn", 12, 4, input_shape=(3, 2, 2))(torch.rand(2, 12)).shape == (2, 4)


# --------------------------------------------------------------------------- recipes


def test_optimizer_recipes_and_defaults():
    # today's defaults are unchanged
    assert default_recipe("mlp").optimizer == "sgd" and default_recipe("mlp").schedule == "step"
    assert default_recipe("logreg").name == "lbfgs"
    r = default_recipe("resnet")
    assert (r.name, r.optimizer, r.schedule) == ("sgd", "momentum", "cosine")
    assert r.epochs >= 20 and r.batch_size == 128 and r.weight_decay > 0
    a = default_recipe("resnet", optimizer="adamw")
    assert a.optimizer == "adamw" and a.lr < r.lr
    assert default_recipe("mlp", "adamw") == default_recipe("mlp", optimizer="adamw")
    assert default_recipe("mlp", optimizer="momentum").momentum == 0.9
    g = default_recipe("gpt")
    assert (g.optimizer, g.betas, g.grad_clip) == ("adamw", (0.9, 0.95), 1.0) and g.warmup_steps > 0
    assert default_recipe("cnn", optimizer="sgd").optimizer == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        Recipe("sgd", weight_decay=0.0, optimizer="adam")
    with pytest.raises(ValueError, match="schedule"):
        Recipe("sgd", weight_decay=0.0, schedule="linear")
    with pytest.raises(ValueError, match="lbfgs"):
        default_recipe("logreg", "lbfgs", optimizer="adamw")
    with pytest.raises(ValueError, match="lbfgs"):
        default_recipe("resnet", "lbfgs")
    with pytest.raises(ValueError):
        default_recipe("mlp", optimizer="rmsprop")
    with pytest.raises(ValueError, match="max_steps"):
        Recipe("sgd", weight_decay=0.0, max_steps=0)
    assert Recipe("sgd", 0.0, betas=[0.8, 0.9]).to_dict()["betas"] == [0.8, 0.9]

    p = [nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(p, Recipe("sgd", 1e-3, optimizer="momentum"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-3
    assert make_optimizer(p, Recipe("sgd", 0.0)).defaults["momentum"] == 0.0
    w = make_optimizer(p, Recipe("sgd", 0.05, optimizer="adamw", betas=(0.9, 0.95)))
    assert isinstance(w, torch.optim.AdamW) and w.defaults["weight_decay"] == 0.05
    assert tuple(w.defaults["betas"]) == (0.9, 0.95)


def test_lr_schedules():
    r = Recipe("sgd", 0.0, epochs=4, batch_size=10, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at_step(r, t, 5) for t in range(20)]
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    assert lrs[19 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 19)))
    w = Recipe("sgd", 0.0, epochs=4, batch_size=10, lr=1.0, schedule="cosine", warmup_steps=4)
    assert [lr_at_step(w, t, 5) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at_step(w, 19, 5) == pytest.approx(0.0, abs=1e-12)
    s = Recipe("sgd", 0.0, epochs=4, batch_size=10, lr=1.0, lr_decay_epochs=2, gamma=0.5)
    assert [lr_at_step(s, t, 5) for t in (0, 9, 10, 19)] == [1.0, 1.0, 0.5, 0.5]
    assert lr_at_epoch(r, 0) == pytest.approx(1.0)
    assert lr_at_epoch(r, 3) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.75 * math.pi)))
    # max_steps truncates the batch schedule and the cosine
    m = Recipe("sgd", 0.0, epochs=3, batch_size=10, lr=1.0, schedule="cosine", max_steps=7)
    assert len(batch_schedule(100, m)) == 7
    assert lr_at_step(m, 6, 10) == pytest.approx(0.0, abs=1e-12)


def _replay(model, X, y, recipe, forget):
    """Reference retraining: a hand-built torch optimizer over the original batch order minus
    ``forget``, each step at its original step's learning rate."""
    params = list(model.parameters())
    if recipe.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                                weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              momentum=recipe.momentum if recipe.optimizer == "momentum" else 0.0)
    spe = steps_per_epoch(X.shape[0], recipe)
    model.train()
    for t, b in retain_schedule_with_steps(batch_schedule(X.shape[0], recipe), forget):
        for group in opt.param_groups:
            group["lr"] = lr_at_step(recipe, t, spe)
        opt.zero_grad()
        loss_fn(model(X[b]), y[b]).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("kind,optimizer", [("mlp", "momentum"), ("mlp", "adamw"),
                                            ("cnn", "momentum"), ("cnn", "adamw")])
def test_retraining_replays_the_recipe(digits, kind, optimizer):
    X, y = digits.X_train[:160], digits.y_train[:160]
    recipe = Recipe("sgd", weight_decay=1e-3, epochs=3, batch_size=32, lr=0.05 if optimizer == "momentum" else 3e-3,
                    optimizer=optimizer, schedule="cosine", warmup_steps=2, seed=2)
    forget, retain = forget_split(160, 0.25, seed=1)
    created, lrs = [], []
    a = make_model(kind, 64, 10, seed=0)
    train(a, X, y, recipe, indices=retain, optimizer_callback=created.append,
          step_callback=lambda lr, indices=None: lrs.append(lr))
    assert len(created) == 1 and isinstance(created[0], torch.optim.Optimizer)
    assert not a.training  # left in eval mode
    kept = retain_schedule_with_steps(batch_schedule(160, recipe), forget)
    assert lrs == pytest.approx([lr_at_step(recipe, t, 5) for t, _ in kept])
    b = make_model(kind, 64, 10, seed=0)
    _replay(b, X, y, recipe, forget)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # retraining on every row is training
    c, d = make_model(kind, 64, 10, seed=0), make_model(kind, 64, 10, seed=0)
    train(c, X, y, recipe)
    train(d, X, y, recipe, indices=torch.arange(160))
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), d.state_dict().values()))


def test_optimizer_step_hook_sees_every_step(digits):
    X, y = digits.X_train[:96], digits.y_train[:96]
    recipe = Recipe("sgd", 0.0, epochs=2, batch_size=32, lr=1e-3, optimizer="adamw")
    calls = []

    def attach(opt):
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.param_groups[0]["lr"]))

    train(make_model("mlp", 64, 10), X, y, recipe, optimizer_callback=attach)
    assert len(calls) == 6


@pytest.mark.parametrize("kind,optimizer", [("cnn", "momentum"), ("resnet", "adamw")])
def test_small_image_models_memorise(digits, kind, optimizer):
    """The per-kind recipes (shortened) drive a small subset to ~100 % train accuracy."""
    idx = torch.arange(256)
    X, y = digits.X_train[idx], digits.y_train[idx]
    recipe = default_recipe(kind, optimizer=optimizer)
    recipe.epochs, recipe.batch_size = 12, 32
    model = make_model(kind, 64, 10, seed=0)
    stats = train(model, X, y, recipe)
    assert stats["steps"] == 12 * 8
    assert _acc(model, X, y) >= 0.98
    assert stats["final_loss"] == pytest.approx(objective(model, X, y, recipe.weight_decay))
