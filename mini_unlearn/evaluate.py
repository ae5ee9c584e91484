"""How good is an unlearned model? Accuracy, closeness to retraining, membership inference.

Data arguments ``forget``, ``retain``, ``test`` are ``(X, y)`` tuples of tensors.

- Closeness to the retrained reference: parameter distance (absolute, and relative to the
  original model's distance from it) and the mean ``KL(reference || model)`` of the outputs.
- Membership inference (MIA), two views:

  * :func:`mia_loss` / :func:`mia_entropy`: can a one-feature logistic-regression attacker tell
    forget samples from test samples by their loss (resp. prediction entropy)? Balanced classes,
    mean accuracy over 10 stratified 70/30 splits: **0.5 is ideal** (indistinguishable, as after
    retraining when forget and test are drawn alike); higher means the forget set still looks
    like training data.
  * :func:`mia_efficacy_svc` (SalUn's MIA-Efficacy, exactly as Fan et al.'s code defines it:
    ``SVC(C=3, kernel="rbf", gamma="auto")`` on one feature, the softmax probability of the true
    class, trained on retain (members, 1) against test (non-members, 0), balanced; applied to
    the forget set: the fraction predicted non-member) and :func:`mia_efficacy` (the same
    protocol with a standardised logistic regression on four features: true-class probability
    and its log, entropy, modified entropy). Higher means more forgetting; a retrained model is
    the target value, not 1. JSON keys: ``mia_efficacy_svc`` and ``mia_efficacy_4feat``.

- SalUn's summary (Fan et al., ICLR 2024): UA = 1 − forget accuracy, RA = retain accuracy,
  TA = test accuracy, MIA-Efficacy (the SVC one) and :func:`avg_gap`, the mean ``|Δ|`` to
  retraining over those four, in percentage points. RTE is the method's wall-clock seconds.
"""
from __future__ import annotations

import contextlib
import resource
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["accuracy", "per_sample_loss", "predict_proba", "predict_log_proba", "mia_loss",
           "mia_entropy", "mia_efficacy", "mia_efficacy_svc", "svc_efficacy_from_confidence",
           "true_class_confidence", "avg_gap", "SALUN_KEYS", "param_distance", "kl_to", "evaluate", "peak_rss_bytes"]

XY = tuple[Tensor, Tensor]
_CHUNK = 8192


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


#: (model, X) -> logits while :func:`_reuse_logits` is active (one :func:`evaluate` call)
_LOGITS: list[tuple[nn.Module, Tensor, Tensor]] | None = None


@contextlib.contextmanager
def _reuse_logits():
    """Run each (model, X) pair once: within one :func:`evaluate` call no model changes, and
    its metrics read the same sets' outputs up to six times (a convolutional model's forward
    passes over the test set dominate a sweep's evaluation)."""
    global _LOGITS
    outer = _LOGITS
    if outer is None:
        _LOGITS = []
    try:
        yield
    finally:
        _LOGITS = outer


@torch.no_grad()
def _logits(model: nn.Module, X: Tensor) -> Tensor:
    if _LOGITS is not None:
        for m, x, out in _LOGITS:
            if m is model and x is X:
                return out
    Xd = X.to(_dtype(model))
    if Xd.shape[0] <= _CHUNK:
        out = model(Xd)
    else:
        out = torch.cat([model(Xd[i:i + _CHUNK]) for i in range(0, Xd.shape[0], _CHUNK)])
    if _LOGITS is not None:
        _LOGITS.append((model, X, out))
    return out


def predict_log_proba(model: nn.Module, X: Tensor) -> Tensor:
    """Log-softmax of the model's outputs, ``[n, classes]`` (no grad)."""
    return torch.log_softmax(_logits(model, X), dim=1)


def predict_proba(model: nn.Module, X: Tensor) -> Tensor:
    """Softmax of the model's outputs, ``[n, classes]`` (no grad)."""
    return torch.softmax(_logits(model, X), dim=1)


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of ``X`` classified as ``y`` (``nan`` for an empty set)."""
    if X.shape[0] == 0:
        return float("nan")
    return float((_logits(model, X).argmax(dim=1) == y.to(torch.long)).double().mean())


def per_sample_loss(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of every sample, ``[n]`` (no grad)."""
    return F.cross_entropy(_logits(model, X), y.to(torch.long), reduction="none")


def _entropy(logp: Tensor) -> Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=1)


def _attack_score(feat_pos: np.ndarray, feat_neg: np.ndarray, seed: int) -> float:
    """Balanced (by subsampling the larger set) 10-split mean test accuracy of a logistic
    regression separating ``feat_pos`` (label 1) from ``feat_neg`` (label 0)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    m = min(len(feat_pos), len(feat_neg))
    if m < 4:
        raise ValueError(f"MIA needs at least 4 samples in each set, got {len(feat_pos)} and "
                         f"{len(feat_neg)}")
    pos = feat_pos[rng.choice(len(feat_pos), m, replace=False)] if len(feat_pos) > m else feat_pos
    neg = feat_neg[rng.choice(len(feat_neg), m, replace=False)] if len(feat_neg) > m else feat_neg
    Xf = np.concatenate([pos, neg]).reshape(2 * m, -1).astype(np.float64)
    yf = np.concatenate([np.ones(m, dtype=np.int64), np.zeros(m, dtype=np.int64)])
    Xf = np.nan_to_num(Xf, nan=0.0, posinf=1e6, neginf=-1e6)
    splitter = StratifiedShuffleSplit(n_splits=10, test_size=0.3, random_state=seed)
    scores = []
    for tr, te in splitter.split(Xf, yf):
        clf = make_pipeline(StandardScaler(), LogisticRegression())
        clf.fit(Xf[tr], yf[tr])
        scores.append(clf.score(Xf[te], yf[te]))
    return float(np.mean(scores))


def mia_loss(model: nn.Module, forget: XY, test: XY, seed: int = 0) -> float:
    """Loss-based MIA accuracy, forget (members, 1) vs test (non-members, 0); 0.5 is ideal."""
    lf = per_sample_loss(model, *forget).double().numpy()
    lt = per_sample_loss(model, *test).double().numpy()
    return _attack_score(lf, lt, seed)


def mia_entropy(model: nn.Module, forget: XY, test: XY, seed: int = 0) -> float:
    """Entropy-based MIA accuracy, forget (1) vs test (0); 0.5 is ideal."""
    ef = _entropy(predict_log_proba(model, forget[0])).double().numpy()
    et = _entropy(predict_log_proba(model, test[0])).double().numpy()
    return _attack_score(ef, et, seed)


def _efficacy_features(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """Per sample: true-class probability, its log (= -loss), entropy, modified entropy
    (Song & Mittal 2021) -- all from the output probabilities."""
    logp = predict_log_proba(model, X).double()
    p = logp.exp()
    y = y.to(torch.long)[:, None]
    py = p.gather(1, y).squeeze(1)
    logpy = logp.gather(1, y).squeeze(1).clamp(min=-1e4)
    ent = _entropy(logp)
    # Mentr = -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j)
    terms = -p * torch.log1p(-p.clamp(max=1 - 1e-12))
    others = terms.sum(1) - terms.gather(1, y).squeeze(1)
    mod_ent = -(1 - py) * logpy + others
    feats = torch.stack([py, logpy, ent, mod_ent], dim=1)
    return feats.numpy()


def mia_efficacy(model: nn.Module, forget: XY, retain: XY, test: XY, seed: int = 0) -> float:
    """MIA-Efficacy, 4-feature variant: fraction of forget samples an attacker calls non-members.

    SalUn's protocol with a richer attacker (SalUn's own is :func:`mia_efficacy_svc`).

    The attacker (standardised logistic regression on output-probability features: true-class
    probability and its log, entropy, modified entropy) is trained on retain (members, 1) vs
    test (non-members, 0), balanced by subsampling the larger set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fr = _efficacy_features(model, *retain)
    ft = _efficacy_features(model, *test)
    ff = _efficacy_features(model, *forget)
    if len(ff) == 0:
        raise ValueError("mia_efficacy needs a non-empty forget set")
    rng = np.random.default_rng(seed)
    m = min(len(fr), len(ft))
    if m < 2:
        raise ValueError(f"mia_efficacy needs at least 2 retain and 2 test samples, got {len(fr)}, {len(ft)}")
    fr = fr[rng.choice(len(fr), m, replace=False)] if len(fr) > m else fr
    ft = ft[rng.choice(len(ft), m, replace=False)] if len(ft) > m else ft
    Xa = np.nan_to_num(np.concatenate([fr, ft]), nan=0.0, posinf=1e6, neginf=-1e6)
    ya = np.concatenate([np.ones(m, dtype=np.int64), np.zeros(m, dtype=np.int64)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    clf.fit(Xa, ya)
    pred = clf.predict(np.nan_to_num(ff, nan=0.0, posinf=1e6, neginf=-1e6))
    return float((pred == 0).mean())


def true_class_confidence(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """Softmax probability of the true class of every sample, ``[n]`` float64."""
    p = predict_proba(model, X).double()
    return p.gather(1, y.to(torch.long).reshape(-1, 1)).reshape(-1).numpy()


def svc_efficacy_from_confidence(member: np.ndarray, non_member: np.ndarray,
                                 target: np.ndarray) -> float:
    """SalUn's SVC attack on precomputed one-dimensional features.

    Fits ``sklearn.svm.SVC(C=3, kernel="rbf", gamma="auto")`` on ``member`` (label 1) and
    ``non_member`` (label 0) and returns the fraction of ``target`` predicted 0 (non-member).
    The caller balances the two training sets (:func:`mia_efficacy_svc` does).
    """
    from sklearn.svm import SVC

    member = np.asarray(member, dtype=np.float64).reshape(-1, 1)
    non_member = np.asarray(non_member, dtype=np.float64).reshape(-1, 1)
    target = np.asarray(target, dtype=np.float64).reshape(-1, 1)
    if len(member) < 1 or len(non_member) < 1:
        raise ValueError(f"the SVC attack needs members and non-members, got {len(member)} and "
                         f"{len(non_member)}")
    if len(target) == 0:
        raise ValueError("the SVC attack needs a non-empty target set")
    X = np.concatenate([member, non_member])
    y = np.concatenate([np.ones(len(member), dtype=np.int64), np.zeros(len(non_member), dtype=np.int64)])
    clf = SVC(C=3, kernel="rbf", gamma="auto")
    clf.fit(X, y)
    return float((clf.predict(target) == 0).mean())


def mia_efficacy_svc(model: nn.Module, forget: XY, retain: XY, test: XY, seed: int = 0) -> float:
    """SalUn's MIA-Efficacy (Fan et al., ICLR 2024, their ``SVC_MIA`` "confidence" entry).

    Feature: the softmax probability of the true class. Attacker: ``SVC(C=3, kernel="rbf",
    gamma="auto")`` trained on retain samples (members) against test samples (non-members),
    balanced: the larger of the two sets is cut to the size of the smaller by a seeded random
    subset (their code takes the first ``len(test)`` retain samples; ours are in random order
    anyway). Returns the fraction of forget samples it predicts as non-members.
    """
    cr = true_class_confidence(model, *retain)
    ct = true_class_confidence(model, *test)
    cf = true_class_confidence(model, *forget)
    if len(cf) == 0:
        raise ValueError("mia_efficacy_svc needs a non-empty forget set")
    rng = np.random.default_rng(seed)
    m = min(len(cr), len(ct))
    if m < 2:
        raise ValueError(f"mia_efficacy_svc needs at least 2 retain and 2 test samples, got "
                         f"{len(cr)}, {len(ct)}")
    cr = cr[rng.choice(len(cr), m, replace=False)] if len(cr) > m else cr
    ct = ct[rng.choice(len(ct), m, replace=False)] if len(ct) > m else ct
    return svc_efficacy_from_confidence(cr, ct, cf)


#: SalUn's four compared metrics (fractions in the JSON), in the order of their tables.
SALUN_KEYS = ("ua", "retain_acc", "test_acc", "mia_efficacy_svc")


def avg_gap(metrics: dict, reference: dict) -> float:
    """SalUn's Avg.Gap: mean ``|Δ|`` to retraining over UA, RA, TA and MIA-Efficacy (SVC), in
    percentage points (metrics given as fractions, as :func:`evaluate` returns them)."""
    missing = [k for k in SALUN_KEYS if k not in metrics or k not in reference]
    if missing:
        raise KeyError(f"avg_gap needs {', '.join(SALUN_KEYS)}; missing {', '.join(missing)}")
    return float(100.0 * np.mean([abs(float(metrics[k]) - float(reference[k])) for k in SALUN_KEYS]))


def _flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def param_distance(model_a: nn.Module, model_b: nn.Module) -> float:
    """``||w_a - w_b||_2`` over all parameters (same architecture required)."""
    pa, pb = list(model_a.parameters()), list(model_b.parameters())
    if len(pa) != len(pb) or any(a.shape != b.shape for a, b in zip(pa, pb)):
        raise ValueError("param_distance needs two models with the same parameter shapes")
    return float((_flat_params(model_a) - _flat_params(model_b)).norm())


def kl_to(model: nn.Module, reference: nn.Module, X: Tensor) -> float:
    """Mean over ``X`` of ``KL(reference(x) || model(x))`` of the softmax outputs (>= 0)."""
    if X.shape[0] == 0:
        return float("nan")
    lp = predict_log_proba(model, X).double()
    lq = predict_log_proba(reference, X).double()
    kl = (lq.exp() * (lq - lp)).sum(dim=1).clamp(min=0.0)
    return float(kl.mean())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``: KiB on Linux,
    bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def evaluate(model: nn.Module, forget: XY, retain: XY, test: XY, reference: nn.Module | None = None,
             original: nn.Module | None = None, seconds: float | None = None,
             peak_rss_bytes: int | None = None, seed: int = 0) -> dict[str, float]:
    """All metrics of one (unlearned) model as plain floats (JSON-able).

    Always: ``test_acc`` (SalUn's TA), ``retain_acc`` (RA), ``forget_acc`` and ``ua``
    (= 1 − forget accuracy), ``mia_loss``, ``mia_entropy``, ``mia_efficacy_svc`` (SalUn's
    MIA-Efficacy) and ``mia_efficacy_4feat`` (the 4-feature logistic-regression variant).
    With a ``reference`` (the retrained model): ``l2_to_retrain``
    (``||w - w_ref||``), ``kl_to_retrain`` (mean ``KL(ref || model)`` on the test set) and
    ``kl_to_retrain_forget`` (on the forget set); with ``original`` too: ``rel_l2_to_retrain``
    = ``||w - w_ref|| / ||w_original - w_ref||`` (``nan`` if the original equals the reference).
    ``seconds`` and ``peak_rss_bytes`` are copied in when given.
    """
    with _reuse_logits():
        return _evaluate(model, forget, retain, test, reference, original, seconds, peak_rss_bytes, seed)


def _evaluate(model: nn.Module, forget: XY, retain: XY, test: XY, reference: nn.Module | None,
              original: nn.Module | None, seconds: float | None, peak_rss_bytes_: int | None,
              seed: int) -> dict[str, float]:
    """:func:`evaluate`'s metrics, each computed on its own (outputs reused only inside
    :func:`_reuse_logits`)."""
    forget_acc = accuracy(model, *forget)
    out: dict[str, float] = {
        "test_acc": accuracy(model, *test),
        "retain_acc": accuracy(model, *retain),
        "forget_acc": forget_acc,
        "ua": 1.0 - forget_acc,
        "mia_loss": mia_loss(model, forget, test, seed=seed),
        "mia_entropy": mia_entropy(model, forget, test, seed=seed),
        "mia_efficacy_svc": mia_efficacy_svc(model, forget, retain, test, seed=seed),
        "mia_efficacy_4feat": mia_efficacy(model, forget, retain, test, seed=seed),
    }
    if reference is not None:
        d = param_distance(model, reference)
        out["l2_to_retrain"] = d
        if original is not None:
            base = param_distance(original, reference)
            out["rel_l2_to_retrain"] = d / base if base > 0 else float("nan")
        out["kl_to_retrain"] = kl_to(model, reference, test[0])
        out["kl_to_retrain_forget"] = kl_to(model, reference, forget[0])
    if seconds is not None:
        out["seconds"] = float(seconds)
    if peak_rss_bytes_ is not None:
        out["peak_rss_bytes"] = float(peak_rss_bytes_)
    return {k: float(v) for k, v in out.items()}
