"""Evaluation metrics: accuracy, closeness to retraining, membership inference."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mini_unlearn.data import load_dataset
import numpy as np
from torch import nn

from mini_unlearn.evaluate import (accuracy, avg_gap, evaluate, kl_to, mia_efficacy,
                                   mia_efficacy_svc, mia_entropy, mia_loss, param_distance,
                                   peak_rss_bytes, per_sample_loss, predict_proba,
                                   svc_efficacy_from_confidence, true_class_confidence)
from mini_unlearn.models import Recipe, default_recipe, make_model, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, preprocess="standardize")


@pytest.fixture(scope="module")
def fitted(digits):
    model = make_model("logreg", digits.num_features, digits.num_classes, seed=0)
    train(model, digits.X_train, digits.y_train, default_recipe("logreg"))
    return model


@pytest.fixture(scope="module")
def memorised(digits):
    """An MLP overfit (no weight decay, 150 epochs) on 300 training samples, 30% of labels noisy;
    retrained twin without the first 100 (the forget set)."""
    g = torch.Generator().manual_seed(0)
    X, y = digits.X_train[:300], digits.y_train[:300].clone()
    noisy = torch.rand(300, generator=g) < 0.3
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    recipe = Recipe("sgd", weight_decay=0.0, epochs=150, batch_size=32, lr=0.1, seed=0)
    original = make_model("mlp", 64, 10, seed=0)
    train(original, X, y, recipe)
    retrained = make_model("mlp", 64, 10, seed=0)
    train(retrained, X, y, recipe, indices=torch.arange(100, 300))
    forget, retain = (X[:100], y[:100]), (X[100:], y[100:])
    return original, retrained, forget, retain


def test_basic_outputs(digits, fitted):
    X, y = digits.X_test, digits.y_test
    p = predict_proba(fitted, X)
    assert p.shape == (360, 10) and torch.allclose(p.sum(1), torch.ones(360, dtype=p.dtype), atol=1e-5)
    acc = accuracy(fitted, X, y)
    assert isinstance(acc, float) and acc > 0.9
    assert acc == pytest.approx(float((p.argmax(1) == y).float().mean()))
    losses = per_sample_loss(fitted, X, y)
    assert losses.shape == (360,) and (losses >= 0).all()
    assert float(losses.mean()) == pytest.approx(
        float(torch.nn.functional.cross_entropy(fitted(X).detach(), y)), rel=1e-5)


def test_mia_same_distribution_is_chance(digits, fitted):
    X, y = digits.X_test, digits.y_test
    forget, test = (X[::2], y[::2]), (X[1::2], y[1::2])  # two halves of held-out data
    assert abs(mia_loss(fitted, forget, test, seed=0) - 0.5) < 0.1
    assert abs(mia_entropy(fitted, forget, test, seed=0) - 0.5) < 0.1
    assert mia_loss(fitted, forget, test, seed=0) == mia_loss(fitted, forget, test, seed=0)


def test_mia_detects_memorisation(digits, memorised):
    original, retrained, forget, retain = memorised
    test = (digits.X_test, digits.y_test)
    assert accuracy(original, *forget) > 0.99  # noisy labels memorised
    assert mia_loss(original, forget, test) > 0.6
    assert mia_entropy(original, forget, test) > 0.6
    # the retrained model never saw the forget set: much closer to chance
    assert mia_loss(retrained, forget, test) < mia_loss(original, forget, test) - 0.1
    # MIA-efficacy: forget samples look like members to the attack on the original only
    eff_orig = mia_efficacy(original, forget, retain, test)
    eff_retr = mia_efficacy(retrained, forget, retain, test)
    assert 0.0 <= eff_orig <= 1.0 and 0.0 <= eff_retr <= 1.0
    assert eff_orig < 0.3 and eff_retr > eff_orig + 0.3


def test_distances(fitted):
    twin = copy.deepcopy(fitted)
    assert param_distance(fitted, twin) == 0.0
    X = torch.randn(50, 64)
    assert kl_to(fitted, twin, X) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        twin.bias += 1.0
        twin.weight[0, 0] += 0.5
    assert param_distance(fitted, twin) == pytest.approx((10 * 1.0 + 0.25) ** 0.5, rel=1e-5)
    assert kl_to(twin, fitted, X) > 0
    with pytest.raises(ValueError):
        param_distance(fitted, make_model("mlp", 64, 10))


def test_evaluate_keys_and_json(digits, memorised):
    original, retrained, forget, retain = memorised
    test = (digits.X_test, digits.y_test)
    base = {"test_acc", "retain_acc", "forget_acc", "ua", "mia_loss", "mia_entropy",
            "mia_efficacy_svc", "mia_efficacy_4feat"}
    out = evaluate(original, forget, retain, test)
    assert set(out) == base
    out = evaluate(original, forget, retain, test, reference=retrained, original=original,
                   seconds=1.5, peak_rss_bytes=peak_rss_bytes())
    assert set(out) == base | {"l2_to_retrain", "rel_l2_to_retrain", "kl_to_retrain",
                               "kl_to_retrain_forget", "seconds", "peak_rss_bytes"}
    assert all(type(v) is float for v in out.values())
    assert out["rel_l2_to_retrain"] == pytest.approx(1.0)
    assert out["seconds"] == 1.5 and out["peak_rss_bytes"] > 10 * 2**20
    json.dumps(out)
    same = evaluate(retrained, forget, retain, test, reference=retrained, original=original)
    assert same["l2_to_retrain"] == 0.0 and same["rel_l2_to_retrain"] == 0.0
    assert same["kl_to_retrain"] == pytest.approx(0.0, abs=1e-7)


def test_evaluate_runs_each_model_once_per_set(digits, memorised):
    """evaluate() reuses each (model, set)'s outputs across its metrics, with the same values as
    the metrics computed one by one."""
    import mini_unlearn.evaluate as E

    original, retrained, forget, retain = memorised
    test = (digits.X_test, digits.y_test)
    calls = {"original": 0, "retrained": 0}
    hooks = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, m in (("original", original), ("retrained", retrained))]
    try:
        out = evaluate(original, forget, retain, test, reference=retrained, original=original)
        assert calls == {"original": 3, "retrained": 2}  # forget, retain, test; test, forget
        assert E._LOGITS is None  # nothing kept after the call
        calls.update(original=0, retrained=0)
        one_by_one = E._evaluate(original, forget, retain, test, retrained, original, None, None, 0)
        assert calls["original"] > 3
    finally:
        for h in hooks:
            h.remove()
    assert out == one_by_one


def _confidence_model():
    """Two classes, logits (x0, 0): the class-0 probability of input (a, ·) is sigmoid(a)."""
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        m.bias.zero_()
    return m


def _inputs(conf):
    """Inputs whose true class 0 gets probability ``conf`` under :func:`_confidence_model`."""
    c = torch.tensor(conf, dtype=torch.float64)
    a = torch.log(c) - torch.log1p(-c)
    X = torch.stack([a, torch.zeros_like(a)], 1).float()
    return X, torch.zeros(len(conf), dtype=torch.long)


def test_svc_efficacy_hand_computed():
    # Members sit near confidence 1, non-members near 0.1: with C=3, an RBF kernel of gamma
    # 1/n_features = 1, the boundary lies between the clusters, so forget samples at 0.97 and
    # 0.99 are members and those at 0.12 and 0.08 non-members: efficacy 2/4.
    members = [0.90, 0.95, 0.99, 0.92, 0.97, 0.93]
    non_members = [0.10, 0.20, 0.05, 0.15, 0.12, 0.08]
    forget = [0.97, 0.12, 0.08, 0.99]
    assert svc_efficacy_from_confidence(np.array(members), np.array(non_members),
                                        np.array(forget)) == 0.5
    assert svc_efficacy_from_confidence(members, non_members, [0.02, 0.03, 0.96]) == pytest.approx(2 / 3)
    # Through a model whose true-class confidences are exactly these: retain holds twice as
    # many samples as test; the balanced subsample keeps the verdict.
    model = _confidence_model()
    retain = _inputs(members + members)
    test = _inputs(non_members)
    f = _inputs(forget)
    assert true_class_confidence(model, *f) == pytest.approx(forget, abs=1e-6)
    assert mia_efficacy_svc(model, f, retain, test, seed=0) == 0.5
    with pytest.raises(ValueError):
        svc_efficacy_from_confidence(members, non_members, [])


def test_svc_efficacy_uses_salun_svc(monkeypatch):
    import sklearn.svm

    seen = {}
    real = sklearn.svm.SVC

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(sklearn.svm, "SVC", spy)
    svc_efficacy_from_confidence([0.9, 0.8], [0.1, 0.2], [0.5])
    assert seen == {"C": 3, "kernel": "rbf", "gamma": "auto"}


def test_avg_gap_hand_computed():
    ref = {"ua": 0.05, "retain_acc": 1.0, "test_acc": 0.90, "mia_efficacy_svc": 0.10}
    m = {"ua": 0.01, "retain_acc": 0.99, "test_acc": 0.93, "mia_efficacy_svc": 0.02}
    # |Δ| = 4, 1, 3, 8 points -> mean 4
    assert avg_gap(m, ref) == pytest.approx(4.0)
    assert avg_gap(ref, ref) == 0.0
    with pytest.raises(KeyError):
        avg_gap({"ua": 0.0}, ref)


def test_evaluate_salun_metrics(digits, memorised):
    original, retrained, forget, retain = memorised
    test = (digits.X_test, digits.y_test)
    out = evaluate(original, forget, retain, test)
    assert out["ua"] == pytest.approx(1.0 - out["forget_acc"])
    assert out["mia_efficacy_svc"] == mia_efficacy_svc(original, forget, retain, test, seed=0)
    # The noisy labels are memorised: the SVC calls the forget set members before unlearning,
    # and far more of it non-members after retraining.
    assert mia_efficacy_svc(retrained, forget, retain, test) > out["mia_efficacy_svc"] + 0.2
