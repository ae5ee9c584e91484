"""U-LiRA (mini_unlearn/audit.py): balanced shadow assignment, vmap shadow training equal to
``models.train``, an unbiased attack on exchangeable groups, and on digits / logistic regression
with 8 shadows: retraining scores 0.5 (± 0.05), the untouched original clearly more."""
import numpy as np
import pytest
import torch

from mini_unlearn import models as M
from mini_unlearn.audit import AuditConfig, AuditError, assign, lira_scores, run_audit, train_shadows, ulira_attack
from mini_unlearn.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_assignment_is_balanced():
    targets = torch.tensor([0, 3, 5, 9, 10])
    inside = assign(40, targets, 8, seed=0)
    assert inside.shape == (8, 40)
    assert (inside.sum(1) == 20).all()  # every shadow trains on half the pool
    assert (inside[:, targets].sum(0) == 4).all()  # every target in exactly half the shadows


def test_lira_score_is_logit_of_true_class_confidence():
    model = torch.nn.Linear(3, 4)
    X, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    with torch.no_grad():
        p = torch.softmax(model(X).double(), 1).gather(1, y[:, None]).reshape(-1)
    assert lira_scores(model, X, y) == pytest.approx((torch.log(p) - torch.log1p(-p)).numpy(), rel=1e-6)


def test_attack_is_unbiased_on_exchangeable_groups_and_detects_a_shift():
    N, k = 8, 128
    accs, shifted = [], []
    for rep in range(20):
        rng = np.random.default_rng(rep)
        inside = assign(2 * k + 10, torch.arange(k), N, seed=rep)[:, :k].numpy()
        noise = rng.normal(size=(N, k)) + 2 * rng.normal(size=(1, k)) + 0.5 * rng.normal(size=(N, 1))
        accs.append(ulira_attack(noise, inside, seed=rep)["accuracy"])
        shifted.append(ulira_attack(noise + 1.0 * inside, inside, seed=rep)["accuracy"])
    assert abs(np.mean(accs) - 0.5) < 0.015
    assert np.mean(shifted) > 0.58
    with pytest.raises(AuditError):
        ulira_attack(np.zeros((4, 3)), np.array([[1, 1, 1]] * 2 + [[0, 0, 0]] * 2, dtype=bool))


def test_vmap_training_matches_models_train():
    ds = load_dataset("digits", seed=0)
    recipe = M.default_recipe("mlp", "sgd")
    recipe.epochs = 2
    recipes = []
    for s in range(3):
        r = M.Recipe(**recipe.to_dict())
        r.seed = s
        recipes.append(r)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randperm(ds.n_train, generator=g)[:300] for _ in range(3)]
    makes = [lambda s=s: M.make_model("mlp", 64, 10, seed=s) for s in range(3)]
    vm, _, how = train_shadows(makes, ds.X_train, ds.y_train, rows, recipes, "vmap")
    lp, _, how2 = train_shadows(makes, ds.X_train, ds.y_train, rows, recipes, "loop")
    assert (how, how2) == ("vmap", "loop")
    for a, b in zip(vm, lp):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-5), float((p - q).abs().max())
    with pytest.raises(AuditError):
        train_shadows(makes, ds.X_train, ds.y_train, rows, [M.default_recipe("logreg")] * 3, "vmap")


@pytest.fixture(scope="module")
def digits_audit(one_thread):
    # Logistic regression that memorises: no weight decay, 200-sample pool (each shadow trains
    # on 100), SGD at lr 1 for 100 epochs.
    cfg = AuditConfig(data="digits", model="logreg", methods=("original", "retrain", "finetune"),
                      shadows=8, targets=100, pool=200, recipe="sgd", weight_decay=0.0, lr=1.0,
                      epochs=100, seed=0)
    return run_audit(cfg, progress=False)


def test_ulira_retrain_is_chance_and_original_is_not(digits_audit):
    ms = digits_audit["methods"]
    assert abs(ms["retrain"]["accuracy"] - 0.5) <= 0.05
    assert abs(ms["retrain"]["auc"] - 0.5) <= 0.06
    assert ms["original"]["accuracy"] >= ms["retrain"]["accuracy"] + 0.08
    assert ms["original"]["auc"] >= ms["retrain"]["auc"] + 0.1
    assert ms["original"]["forget_acc"] > ms["retrain"]["forget_acc"]
    assert digits_audit["shadow_training"]["how"] == "vmap"
    assert digits_audit["dataset"]["forget_per_shadow"] == 50


def test_bad_config_raises():
    for kw in (dict(shadows=0), dict(shadows=5), dict(methods=("magic",)), dict(methods=()),
               dict(targets=1), dict(train="gpu")):
        with pytest.raises(AuditError):
            AuditConfig(**kw).validate()
