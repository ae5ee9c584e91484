"""Models, recipes, schedules and training loops."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mini_unlearn.data import forget_split, load_dataset
from mini_unlearn.models import (Recipe, batch_schedule, default_recipe, loss_fn, lr_at_epoch,
                                 make_model, objective, objective_and_grad, retain_schedule, train)


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
        make_model("resnet", 64, 10)


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
