"""Curvature on real layers (docs/math.md): K-FAC for Conv2d (KFC) against a dense GGN,
closed-form diagonals for normalisation layers against per-sample autograd, sequence outputs,
the Monte-Carlo Fisher, BatchNorm passes that never touch the running statistics, and
eigendecompositions of degenerate factors. Tiny models: each test takes well under a second."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mini_unlearn as mu
from mini_unlearn import curvature as C
from mini_unlearn.errors import NonFiniteError, UnsupportedTrainingError

pytestmark = pytest.mark.usefixtures("one_thread")


def pass_of(model, data, fisher="ggn", **kw):
    layout = C.Layout.of(model)
    blocks, diag = C.kron_blocks(model, layout)
    s = C.data_pass(model, layout, data, F.cross_entropy, curvature=True, blocks=blocks, diag_names=diag,
                    fisher=fisher, **kw)
    return layout, blocks, diag, s


def exact_ggn(model, layout, X, y, names):
    """Σ_i J_iᵀ (diag p − ppᵀ) J_i for the parameters ``names`` (per-sample Jacobians; eval mode)."""
    from torch.func import functional_call, jacrev

    named = {k: v.detach() for k, v in model.named_parameters()}
    idx = torch.cat([torch.arange(layout.slice(n).start, layout.slice(n).stop) for n in names])
    w0 = layout.get(model)[idx]

    def f(w, xi):
        p, o = dict(named), 0
        for n in names:
            k = layout.numels[layout.index[n]]
            p[n] = w[o:o + k].view(named[n].shape)
            o += k
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    H = torch.zeros(len(idx), len(idx), dtype=torch.float64)
    for xi in X:
        J = jacrev(f)(w0, xi).double()
        pr = torch.softmax(f(w0, xi).double(), -1)
        H += J.T @ (torch.diag(pr) - torch.outer(pr, pr)) @ J
    return H


def kron_block(s, b, n):
    return torch.kron(s.G[b.module].double() / n, s.A[b.module].double() / n)


# ---- Conv2d: KFC ---------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self, bn=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


def test_conv_kfc_matches_the_dense_ggn_scale():
    model = TinyCNN().eval()
    X, y = torch.randn(24, 2, 6, 6), torch.randint(0, 3, (24,))
    layout, blocks, _, s = pass_of(model, (X, y), batch_size=10)
    assert [b.module for b in blocks] == ["conv", "conv2", "fc"]
    assert (blocks[0].d_out, blocks[0].d_in, blocks[0].cols) == (3, 18, 19)
    for b in blocks[:2]:
        K = kron_block(s, b, len(X))
        H = exact_ggn(model, layout, X, y, [b.weight, b.bias]) / len(X)
        # the block's matrix view orders (weight row, column) with the bias last: permute H alike
        perm = torch.tensor([layout.slice(b.weight).start + o * b.d_in + j if j < b.d_in
                             else layout.slice(b.bias).start + o
                             for o in range(b.d_out) for j in range(b.cols)])
        base = min(layout.slice(b.weight).start, layout.slice(b.bias).start)
        H = H[perm - base][:, perm - base]
        tr = float(K.trace() / H.trace())
        fro = float(K.norm() / H.norm())
        # a wrong normalisation over the T = 36 / 4 positions is off by that factor
        assert 0.6 < tr < 1.6, (b.module, tr)
        assert 0.5 < fro < 2.0, (b.module, fro)


def test_conv_with_one_output_position_is_the_equivalent_linear_and_exact_per_sample():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Tanh(), nn.Linear(5, 3))
    lin = nn.Sequential(nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        lin[1].weight.copy_(conv[0].weight.view(5, 18))
        lin[1].bias.copy_(conv[0].bias)
        lin[3].load_state_dict(conv[3].state_dict())
    X, y = torch.randn(7, 2, 3, 3), torch.randint(0, 3, (7,))
    _, bc, _, sc = pass_of(conv, (X, y))
    _, bl, _, sl = pass_of(lin, (X, y))
    torch.testing.assert_close(sc.A["0"], sl.A["1"])
    torch.testing.assert_close(sc.G["0"], sl.G["1"])
    torch.testing.assert_close(sc.grad, sl.grad)
    # one sample, one position: K-FAC is the exact GGN block
    layout, b, _, s1 = pass_of(conv, (X[:1], y[:1]))
    H = exact_ggn(conv, layout, X[:1], y[:1], ["0.weight", "0.bias"])
    perm = torch.tensor([o * 18 + j if j < 18 else 90 + o for o in range(5) for j in range(19)])
    torch.testing.assert_close(kron_block(s1, b[0], 1), H[perm][:, perm], rtol=1e-4, atol=1e-6)


def test_conv_A_on_a_subgrid_is_the_mean_over_those_positions(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 36, 2))
    X, y = torch.randn(64, 2, 6, 6), torch.randint(0, 2, (64,))
    full = pass_of(model, (X, y))[3]
    monkeypatch.setattr(C.rule_for(model[0]), "max_positions", 9)  # 36 positions -> every 2nd: 9
    sub = pass_of(model, (X, y))[3]
    p = F.unfold(X, 3, padding=1).view(64, 18, 6, 6)[:, :, ::2, ::2].reshape(64, 18, 9)
    a = torch.cat([p, torch.ones(64, 1, 9)], 1)
    torch.testing.assert_close(sub.A["0"], torch.einsum("bit,bjt->ij", a, a) / 9, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.G["0"], full.G["0"])  # G always sums every position
    assert not torch.allclose(sub.A["0"], full.A["0"])  # (its fidelity on images: the benchmark)


def test_grouped_conv_is_refused_with_a_typed_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    with pytest.raises(UnsupportedTrainingError, match="groups=2"):
        C.kron_blocks(model, C.Layout.of(model))


# ---- normalisation layers: closed-form diagonals -------------------------------------------------

class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(16, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.gn(self.bn(self.conv(x))))
        h = F.avg_pool2d(h, 2).flatten(1)
        return self.out(torch.tanh(self.ln(self.fc(h))))


def _with_stats(model):
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        for m in (model.bn, model.gn, model.ln):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("fisher,dead", [("ggn", False), ("empirical", False), ("ggn", True)])
def test_norm_diagonal_matches_per_sample_autograd(fisher, dead):
    model = _with_stats(NormNet()).eval()
    if dead:  # γ = 0 in a channel: x̂ is recomputed from the input, not read off the output
        with torch.no_grad():
            model.bn.weight[1] = 0.0
            model.ln.weight[2] = 0.0
    X, y = torch.randn(9, 2, 6, 6), torch.randint(0, 3, (9,))
    layout, _, diag, s = pass_of(model, (X, y), fisher=fisher, batch_size=4)
    assert diag == ["bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias"]
    params = [dict(model.named_parameters())[n] for n in diag]
    ref = torch.zeros_like(s.diag)
    for xi, yi in zip(X, y):
        o = model(xi[None])
        if fisher == "empirical":
            vs = [None]
        else:
            p = torch.softmax(o.detach()[0], -1)
            vs = [p[c].sqrt() * (F.one_hot(torch.tensor(c), 3).float() - p) for c in range(3)]
        for v in vs:
            target = F.cross_entropy(o, yi[None]) if v is None else (o[0] * v).sum()
            g = torch.autograd.grad(target, params, retain_graph=True)
            ref += torch.cat([t.reshape(-1) for t in g]) ** 2
    torch.testing.assert_close(s.diag, ref, rtol=1e-4, atol=1e-7)


def test_batchnorm_train_mode_pass_and_finalize_leave_the_buffers_untouched():
    model = _with_stats(NormNet()).train()
    X, y = torch.randn(32, 2, 6, 6), torch.randint(0, 3, (32,))
    before = copy.deepcopy(model.state_dict())
    layout, blocks, diag, s = pass_of(model, (X, y), batch_size=32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model.bn.track_running_stats
    # the pass saw batch statistics: its gradient is training's gradient on the same batch
    g = torch.autograd.grad(F.cross_entropy(model(X), y), layout.params(model))
    torch.testing.assert_close(s.grad / 32, layout.flatten(g), rtol=1e-4, atol=1e-6)
    model.load_state_dict(before)
    # ... and with train_mode=False the running statistics are used instead
    s_eval = C.data_pass(model, layout, (X, y), F.cross_entropy, train_mode=False, batch_size=32)
    assert model.training
    g = torch.autograd.grad(F.cross_entropy(model.eval()(X), y), layout.params(model))
    model.train()
    torch.testing.assert_close(s_eval.grad / 32, layout.flatten(g), rtol=1e-4, atol=1e-6)
    log = mu.Recorder(model, checkpoints=0).finalize((X, y), F.cross_entropy, progress=False, batch_size=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(log.meta["diag_params"]) == set(diag) and len(log.meta["kron_blocks"]) == 3
    assert torch.isfinite(log.get("diag/nu")).all()


def test_dense_hessian_runs_with_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).train()
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    before = copy.deepcopy(model.state_dict())
    H = C.dense_hessian(model, C.Layout.of(model), (X, y), F.cross_entropy)
    assert torch.isfinite(H).all() and H.shape == (34, 34)
    # (not symmetric: PyTorch's batch-norm double backward gives non-zero d²L/dγ d(shift), float64 too)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_layer_fallback_is_refused_only_when_it_cannot_run():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), Scale(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    _, _, diag, s = pass_of(model.eval(), (X, y))  # eval: the per-sample vmap fallback runs
    assert "2.s" in diag and torch.isfinite(s.diag).all() and float(s.diag.abs().sum()) > 0
    with pytest.raises(UnsupportedTrainingError, match=r"2\.s.*BatchNorm"):
        pass_of(model.train(), (X, y))


def test_recalibrate_norm_stats_is_the_cumulative_average():
    model = _with_stats(NormNet()).eval()
    model.bn.momentum = 0.3
    X = torch.randn(40, 2, 6, 6)
    data = (X, torch.zeros(40, dtype=torch.long))
    assert C.recalibrate_norm_stats(model, data, batch_size=10) == 1
    with torch.no_grad():
        h = model.conv(X)
    means = torch.stack([h[i:i + 10].mean((0, 2, 3)) for i in range(0, 40, 10)]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, means, rtol=1e-5, atol=1e-6)
    assert model.bn.momentum == 0.3 and not model.training and not model.bn.training
    assert int(model.bn.num_batches_tracked) == 4


# ---- outputs: sequences, Monte-Carlo Fisher -------------------------------------------------------

def seq_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_sequence_outputs_match_the_flattened_tokens():
    """[B, T, V] logits, loss the mean over tokens: K-FAC "expand" equals the same model on the
    B·T tokens as separate samples (same loss, same mean curvature)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 7))
    X, y = torch.randn(6, 3, 4), torch.randint(0, 7, (6, 3))
    layout = C.Layout.of(model)
    blocks, _ = C.kron_blocks(model, layout)
    for fisher in ("ggn", "empirical", "mc"):
        s = C.data_pass(model, layout, (X, y), seq_loss, curvature=True, blocks=blocks, fisher=fisher)
        f = C.data_pass(model, layout, (X.reshape(18, 4), y.reshape(18)), F.cross_entropy, curvature=True,
                        blocks=blocks, fisher=fisher)
        torch.testing.assert_close(s.grad / 6, f.grad / 18)
        for b in blocks:
            torch.testing.assert_close(s.A[b.module] / 6, f.A[b.module] / 18)
            if fisher == "ggn":
                torch.testing.assert_close(s.G[b.module] / 6, f.G[b.module] / 18)
            elif fisher == "empirical":  # per-sample gradients: a sequence's tokens add up
                assert torch.isfinite(s.G[b.module]).all()
    # ignored targets (padding) carry no curvature
    y2 = y.clone()
    y2[:, -1] = -100
    keep = (X[:, :2].reshape(12, 4), y[:, :2].reshape(12))
    s = C.data_pass(model, layout, (X, y2), seq_loss, curvature=True, blocks=blocks[1:])
    f = C.data_pass(model, layout, keep, F.cross_entropy, curvature=True, blocks=blocks[1:])
    torch.testing.assert_close(s.G["2"], f.G["2"] * 6 / 12)


def test_ggn_needs_class_targets():
    model = nn.Linear(3, 2)
    with pytest.raises(UnsupportedTrainingError, match="empirical"):
        pass_of(model, (torch.randn(4, 3), torch.randn(4, 2)))


def test_mc_fisher_is_unbiased_for_the_ggn_and_cancels_exactly_on_subsets():
    model = _with_stats(NormNet()).eval()
    X, y = torch.randn(30, 2, 6, 6), torch.randint(0, 3, (30,))
    _, blocks, _, g = pass_of(model, (X, y))
    _, _, _, m = pass_of(model, (X, y), fisher="mc", mc_samples=400)
    for b in blocks:
        rel = float((m.G[b.module] - g.G[b.module]).norm() / g.G[b.module].norm())
        assert rel < 0.1, (b.module, rel)
    assert float((m.diag - g.diag).norm() / g.diag.norm()) < 0.1
    # draws depend on each sample's content: full − subset == complement (no sampling noise)
    full = pass_of(model, (X, y), fisher="mc", batch_size=7)[3]
    sub = pass_of(model, (X[:10], y[:10]), fisher="mc", batch_size=4)[3]
    rest = pass_of(model, (X[10:], y[10:]), fisher="mc", batch_size=16)[3]
    for b in blocks:
        torch.testing.assert_close(full.G[b.module] - sub.G[b.module], rest.G[b.module], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.diag - sub.diag, rest.diag, rtol=1e-4, atol=1e-6)
    again = pass_of(model, (X, y), fisher="mc", batch_size=7)[3]
    assert torch.equal(again.G["out"], full.G["out"])
    other = pass_of(model, (X, y), fisher="mc", batch_size=7, seed=1)[3]
    assert not torch.equal(other.G["out"], full.G["out"])


# ---- eigendecompositions of degenerate factors ----------------------------------------------------

def test_dead_unit_factor_eigh_falls_back_and_nonfinite_names_the_layer(monkeypatch):
    torch.manual_seed(0)
    a = torch.randn(200, 6)
    a[:, 2:5] = 0.0  # dead units: zero rows and columns
    A = a.T @ a / 200
    real = torch.linalg.eigh

    def flaky(m, *args, **kw):  # LAPACK failing to converge in float32, as on such factors
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    s, U = C.eigh_psd(A, name="conv/A")
    torch.testing.assert_close((U * s) @ U.T, A, rtol=1e-4, atol=1e-5)
    assert (s >= 0).all() and int((s < 1e-6).sum()) == 3
    monkeypatch.setattr(torch.linalg, "eigh", real)
    A[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="conv/A"):
        C.eigh_psd(A, name="conv/A")


def test_dead_units_in_a_trained_cnn_give_finite_factors():
    model = TinyCNN().eval()
    with torch.no_grad():
        model.conv.bias[:2] = -100.0  # two dead channels after ReLU
    X, y = torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,))
    _, blocks, _, s = pass_of(model, (X, y))
    for b in blocks:
        for side in ("A", "G"):
            ev, U = C.eigh_psd(getattr(s, side)[b.module] / 16, name=f"{b.module}/{side}")
            assert torch.isfinite(ev).all() and torch.isfinite(U).all()


def test_ggn_quadratic_is_the_dense_curvature_of_a_linear_model_and_runs_through_batchnorm():
    """For a linear model under cross-entropy the Gauss-Newton matrix is the Hessian: the
    forward-mode quadratic vᵀ G v (mean over the samples) equals vᵀ H v / n from the dense
    Hessian, direction by direction; max_samples truncates to the first rows. Through a train-mode
    BatchNorm it runs and leaves the buffers untouched."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    X, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    lay = C.Layout.of(model)
    H = C.dense_hessian(model, lay, (X, y), F.cross_entropy)
    dirs = [torch.randn(lay.numel) for _ in range(3)]
    q, seen = C.ggn_quadratic(model, lay, (X, y), F.cross_entropy, dirs, batch_size=16)
    assert seen == 40
    want = torch.stack([v @ H @ v / 40 for v in dirs])
    assert torch.allclose(q, want, rtol=1e-4), (q, want)
    q10, seen10 = C.ggn_quadratic(model, lay, (X, y), F.cross_entropy, dirs[:1], batch_size=16, max_samples=10)
    H10 = C.dense_hessian(model, lay, (X[:10], y[:10]), F.cross_entropy)
    assert seen10 == 10 and torch.allclose(q10[0], dirs[0] @ H10 @ dirs[0] / 10, rtol=1e-4)
    bn = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4)).train()
    before = copy.deepcopy(bn.state_dict())
    lay = C.Layout.of(bn)
    q, _ = C.ggn_quadratic(bn, lay, (X, y), F.cross_entropy, [torch.randn(lay.numel)], batch_size=16,
                           train_mode=True)
    assert q.item() > 0 and all(torch.equal(v, bn.state_dict()[k]) for k, v in before.items())
