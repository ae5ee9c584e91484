"""Curvature rules a GPT-style transformer needs (issue 11): nn.Embedding (K-FAC with its exactly
diagonal input factor), tied embedding/head weights (exact summed per-sample diagonal),
nn.MultiheadAttention (packed in_proj + out_proj, against explicit nn.Linear projections), the
memory bound on large factors, the Monte-Carlo Fisher's cost in the vocabulary size, and an
end-to-end record / finalize / trajectory unlearning of one document on a tiny GPT. Tiny
models: seconds in all."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mini_unlearn as mu
from mini_unlearn import curvature as C
from mini_unlearn import models as M
from mini_unlearn import text as TX
from mini_unlearn.curvature import passes as P
from mini_unlearn.curvature.attention import MultiheadAttentionRule
from mini_unlearn.curvature.embedding import EmbeddingRule
from mini_unlearn.errors import UnsupportedTrainingError
from mini_unlearn.gpt import GPT, GPTConfig, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def seq_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def run_pass(model, data, loss=seq_loss, fisher="ggn", max_factor_bytes=None, **kw):
    layout = C.Layout.of(model)
    blocks, diag = C.kron_blocks(model, layout, max_factor_bytes)
    s = C.data_pass(model, layout, data, loss, curvature=True, blocks=blocks, diag_names=diag,
                    fisher=fisher, **kw)
    return layout, blocks, diag, s


# ---- nn.Embedding ----------------------------------------------------------------------------------

class EmbNet(nn.Module):
    def __init__(self, V=7, d=5, C_=4, one_hot=False, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.V, self.one_hot = V, one_hot
        self.emb = nn.Linear(V, d, bias=False) if one_hot else nn.Embedding(V, d, padding_idx=padding_idx)
        self.out = nn.Linear(d, C_)

    def forward(self, x):
        h = self.emb(F.one_hot(x, self.V).float()) if self.one_hot else self.emb(x)
        return self.out(torch.tanh(h))


def test_embedding_is_kfac_of_a_linear_on_one_hot_inputs():
    """The embedding's block equals the block of nn.Linear on one-hot inputs with weight Wᵀ:
    A is exactly diagonal (token counts / T), G and the gradient are the same."""
    X, y = torch.randint(0, 7, (9, 6)), torch.randint(0, 4, (9, 6))
    X[0, :] = 3  # a token repeated within one sample
    e, lin = EmbNet(), EmbNet(one_hot=True)
    with torch.no_grad():
        lin.emb.weight.copy_(e.emb.weight.T)
        lin.out.load_state_dict(e.out.state_dict())
    le, be, _, se = run_pass(e, (X, y), batch_size=4)
    ll, bl, _, sl = run_pass(lin, (X, y), batch_size=4)
    assert be[0].a_diag and be[0].transposed and not bl[0].a_diag
    torch.testing.assert_close(se.A["emb"], sl.A["emb"].diagonal())
    assert float((sl.A["emb"] - torch.diag(sl.A["emb"].diagonal())).abs().max()) == 0.0  # exactly diagonal
    torch.testing.assert_close(se.A["emb"], torch.bincount(X.reshape(-1), minlength=7).float() / 6)
    torch.testing.assert_close(se.G["emb"], sl.G["emb"])
    torch.testing.assert_close(se.A["out"], sl.A["out"])
    # the block's matrix view of the [V, d] weight is Wᵀ: the gradient lines up with the Linear's
    ge = be[0].matrix(le, se.grad)
    torch.testing.assert_close(ge, sl.grad[ll.slice("emb.weight")].view(5, 7))
    scratch = torch.zeros_like(se.grad)
    be[0].scatter(le, scratch, ge)
    torch.testing.assert_close(scratch[le.slice("emb.weight")], se.grad[le.slice("emb.weight")])


def test_embedding_padding_row_has_no_curvature_and_odd_options_are_refused():
    X, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 4, (5, 4))
    X[:, -1] = 0
    _, _, _, s = run_pass(EmbNet(padding_idx=0), (X, y))
    assert float(s.A["emb"][0]) == 0.0 and float(s.A["emb"][1:].sum()) > 0
    for kw in (dict(max_norm=1.0), dict(scale_grad_by_freq=True)):
        net = EmbNet()
        net.emb = nn.Embedding(7, 5, **kw)
        with pytest.raises(UnsupportedTrainingError, match="Embedding 'emb'"):
            run_pass(net, (X, y))


def test_a_layer_on_a_tensor_shared_by_the_batch_is_refused():
    """A position embedding applied to arange(T) and broadcast has no per-sample gradient."""
    class Broadcast(EmbNet):
        def forward(self, x):
            return self.out(torch.tanh(self.emb(torch.arange(x.shape[1])) + 0 * x[..., None]))

    with pytest.raises(UnsupportedTrainingError, match="mixes the samples"):
        run_pass(Broadcast(), (torch.randint(0, 7, (3, 5)), torch.randint(0, 4, (3, 5))))


# ---- tied embedding / head ---------------------------------------------------------------------------

def test_tied_weights_get_the_exact_diagonal_of_both_uses(monkeypatch):
    """A GPT with tied token embedding / head: the shared weight gets no Kronecker block; its
    diagonal (per-sample gradients of both uses summed, then squared) equals the per-sample vmap
    of the whole model, and differs from squaring each use alone (the cross terms count)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=11, seq_len=6, d_model=8, n_layers=1, n_heads=2, tie_weights=True)).eval()
    X, Y = torch.randint(0, 11, (7, 6)), torch.randint(0, 11, (7, 6))
    layout = C.Layout.of(m)
    blocks, diag = C.kron_blocks(m, layout)
    assert "tok.weight" in diag and "tok" not in [b.module for b in blocks] and "head" not in [b.module for b in blocks]
    cheap, rest = C.diag_plan(m, layout, diag)
    assert cheap["tok"] == {"tok.weight": "weight"} and cheap["head"] == {"tok.weight": "weight"} and not rest
    s = C.data_pass(m, layout, (X, Y), lm_loss, curvature=True, blocks=blocks, diag_names=diag, batch_size=4)
    sl = slice(0, layout.numels[layout.index["tok.weight"]])  # tok.weight is the first diagonal parameter
    assert diag[0] == "tok.weight"
    # oracle: the per-sample vmap fallback (functional_call ties the two uses by construction)
    monkeypatch.setattr(EmbeddingRule, "per_sample_attrs", ())
    assert C.diag_plan(m, layout, diag)[1] == ["tok.weight"]
    v = C.data_pass(m, layout, (X, Y), lm_loss, curvature=True, blocks=blocks, diag_names=diag, batch_size=4)
    torch.testing.assert_close(s.diag[sl], v.diag[sl], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(s.diag[sl.stop:], v.diag[sl.stop:])
    # each use alone (squared separately) is not the same thing
    monkeypatch.undo()
    alone = []
    from mini_unlearn.curvature import registry
    for use in ("tok", "head"):
        def plan(model, lay, names, use=use):
            c, r = registry.diag_plan(model, lay, names)
            return {k: val for k, val in c.items() if not ("tok.weight" in val and k != use)}, r
        monkeypatch.setattr(P, "diag_plan", plan)
        alone.append(C.data_pass(m, layout, (X, Y), lm_loss, curvature=True, blocks=blocks, diag_names=diag,
                                 batch_size=4).diag[sl])
        monkeypatch.undo()
    rel = float((alone[0] + alone[1] - s.diag[sl]).norm() / s.diag[sl].norm())
    assert rel > 1e-3, rel


# ---- nn.MultiheadAttention ---------------------------------------------------------------------------

class ExplicitAttention(nn.Module):
    """The same attention as nn.MultiheadAttention, with nn.Linear projections (batch-first)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        E = mha.embed_dim
        self.h = mha.num_heads
        self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out.load_state_dict(mha.out_proj.state_dict())

    def forward(self, x, mask):
        N, L, E = x.shape
        q, k, v = (t.reshape(N, L, self.h, E // self.h).transpose(1, 2) for t in self.qkv(x).split(E, -1))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // self.h) + mask, -1)
        return self.out((w @ v).transpose(1, 2).reshape(N, L, E))


class AttnNet(nn.Module):
    def __init__(self, batch_first=True, explicit=False):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 4)
        self.attn = ExplicitAttention(mha) if explicit else mha

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        L = x.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        if isinstance(self.attn, ExplicitAttention):
            a = self.attn(h, torch.zeros(L, L).masked_fill(causal, float("-inf")))
        else:
            hin = h if self.batch_first else h.transpose(0, 1)
            a, _ = self.attn(hin, hin, hin, attn_mask=causal, need_weights=False, is_causal=True)
            a = a if self.batch_first else a.transpose(0, 1)
        return self.head(h + a)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_factors_match_explicit_linear_projections(batch_first):
    X, y = torch.randn(10, 5, 3), torch.randint(0, 4, (10, 5))
    net, ref = AttnNet(batch_first), AttnNet(batch_first, explicit=True)
    ln, bn, dn, sn = run_pass(net, (X, y), batch_size=4)
    lr, br, _, sr = run_pass(ref, (X, y), batch_size=4)
    assert [b.module for b in bn] == ["inp", "head", "attn.in_proj", "attn.out_proj"] and not dn
    assert [(b.d_out, b.cols, b.hook_module) for b in bn[2:]] == [(24, 9, "attn"), (8, 9, "attn")]
    for mine, theirs in (("inp", "inp"), ("attn.in_proj", "attn.qkv"), ("attn.out_proj", "attn.out"),
                         ("head", "head")):
        torch.testing.assert_close(sn.A[mine], sr.A[theirs], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sn.G[mine], sr.G[theirs], rtol=1e-4, atol=1e-7)
    for b, c in zip(bn, br):
        torch.testing.assert_close(b.matrix(ln, sn.grad), c.matrix(lr, sr.grad), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sn.loss, sr.loss, rtol=1e-5, atol=0)


def test_mha_recomputation_equals_the_module_with_masks_and_weights():
    torch.manual_seed(1)
    for bf in (True, False):
        m = nn.MultiheadAttention(8, 2, batch_first=bf).eval()
        x = torch.randn(3, 5, 8) if bf else torch.randn(5, 3, 8)
        kpm = torch.zeros(3, 5, dtype=torch.bool)
        kpm[1, 3:] = True
        am = torch.randn(5, 5)
        for kw in (dict(attn_mask=am), dict(key_padding_mask=kpm), dict(attn_mask=am, key_padding_mask=kpm,
                                                                          average_attn_weights=False)):
            o, w = m(x, x, x, **kw)
            o2, w2 = MultiheadAttentionRule.forward(m, dict(query=x, key=x, value=x, **kw))
            torch.testing.assert_close(o2, o, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w2, w, rtol=1e-5, atol=1e-6)


def _encoder(V=10, decoder=False):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, 8)
            layer = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
            self.layer = layer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, V)

        def forward(self, x):
            h = self.emb(x)
            L = x.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(L)
            if decoder:
                return self.head(self.layer(h, h.detach() * 0.5, tgt_mask=mask, tgt_is_causal=True))
            return self.head(self.layer(h, src_mask=mask, is_causal=True))
    return LM()


def test_finalize_and_unlearn_on_a_transformer_encoder_layer():
    X = torch.randint(0, 10, (24, 6))
    Y = torch.roll(X, -1, 1)
    model = _encoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    rec = mu.Recorder(model, checkpoints=3, total_steps=12).attach(opt)
    for i in range(12):
        b = torch.arange(24)[(i * 8) % 24:(i * 8) % 24 + 8]
        opt.zero_grad()
        lm_loss(model(X[b]), Y[b]).backward()
        opt.step()
    log = rec.finalize((X, Y), lm_loss, progress=False)
    mods = [b["module"] for b in log.meta["kron_blocks"]]
    assert mods == ["emb", "layer.self_attn.in_proj", "layer.self_attn.out_proj", "layer.linear1",
                    "layer.linear2", "head"]
    assert log.meta["diag_params"] == ["layer.norm1.weight", "layer.norm1.bias", "layer.norm2.weight",
                                       "layer.norm2.bias"]
    before = copy.deepcopy(model.state_dict())
    for mode in ("trajectory", "oneshot"):
        res = mu.unlearn(model, log, indices=torch.arange(4), loss_fn=lm_loss, mode=mode, progress=False)
        w = torch.cat([p.reshape(-1) for p in res.model.parameters()])
        assert torch.isfinite(w).all() and not torch.equal(w, torch.cat([p.reshape(-1) for p in model.parameters()]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cross_attention_and_partial_recording_are_refused():
    X = torch.randint(0, 10, (6, 5))
    dec = _encoder(decoder=True)
    with pytest.raises(UnsupportedTrainingError, match="cross-attention"):
        run_pass(dec, (X, X), loss=lm_loss)
    enc = _encoder()
    layout = C.Layout.of(enc, [n for n, _ in enc.named_parameters() if n != "layer.self_attn.out_proj.bias"])
    with pytest.raises(UnsupportedTrainingError, match="record all of its projection"):
        C.kron_blocks(enc, layout)


# ---- memory bound on factors ----------------------------------------------------------------------

def test_factors_over_the_memory_bound_are_their_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 40))
    X, y = torch.randn(50, 4), torch.randint(0, 40, (50,))
    _, full_b, _, full = run_pass(model, (X, y), loss=F.cross_entropy)
    _, bb, _, s = run_pass(model, (X, y), loss=F.cross_entropy, max_factor_bytes=4 * 30 * 30)
    assert [(b.a_diag, b.g_diag) for b in bb] == [(False, False), (False, True)]
    assert s.G["2"].shape == (40,)
    torch.testing.assert_close(s.G["2"], full.G["2"].diagonal())
    torch.testing.assert_close(s.A["2"], full.A["2"])
    # through the log: the one-shot with the diagonal G stays close to the one with the full G
    steps = []
    for bound in (None, 4 * 30 * 30):
        m = copy.deepcopy(model)
        rec = mu.Recorder(m, checkpoints=0, max_factor_bytes=bound, fisher="ggn")
        log = rec.finalize((X, y), F.cross_entropy, weight_decay=1e-2, progress=False)
        assert ("kfac/2/U_G" in log) == (bound is None)
        res = mu.unlearn(m, log, indices=torch.arange(5), loss_fn=F.cross_entropy, mode="oneshot", progress=False)
        steps.append(torch.cat([(p - q).reshape(-1) for p, q in zip(res.model.parameters(), model.parameters())]))
    rel = float((steps[1] - steps[0]).norm() / steps[0].norm())
    assert 0 < rel < 0.5, rel


# ---- Monte-Carlo Fisher: cost independent of the vocabulary --------------------------------------

def test_mc_fisher_backward_count_does_not_grow_with_the_vocabulary(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    counts = {}
    for fisher in ("mc", "ggn"):
        for V in (16, 96):
            torch.manual_seed(0)
            m = GPT(GPTConfig(vocab_size=V, seq_len=4, d_model=8, n_layers=1, n_heads=2))
            X = torch.randint(0, V, (6, 4))
            calls.clear()
            run_pass(m, (X, torch.roll(X, -1, 1)), loss=lm_loss, fisher=fisher, batch_size=3, mc_samples=2)
            counts[fisher, V] = len(calls)
    assert counts["mc", 16] == counts["mc", 96] == 2 * (1 + 2)  # per batch: the gradient + one per draw
    assert counts["ggn", 96] > counts["ggn", 16]  # the exact GGN: one backward per class


# ---- end to end: forget one document of a tiny GPT ------------------------------------------------

DOCS = ["the quick brown fox jumps over the lazy dog. " * 3,
        "to be or not to be, that is the question. " * 3,
        "all the world's a stage, and all the men and women merely players. " * 2,
        "now is the winter of our discontent made glorious summer. " * 3,
        "a horse, a horse, my kingdom for a horse! " * 3]


def test_gpt_trajectory_forgets_one_document_toward_retraining():
    T = 16
    X, Y, doc = [], [], []
    for d, text in enumerate(DOCS):
        ids = TX.encode(text)
        n = (ids.numel() - 1) // T
        X.append(ids[:n * T].view(n, T))
        Y.append(ids[1:n * T + 1].view(n, T))
        doc += [d] * n
    X, Y, doc = torch.cat(X), torch.cat(Y), torch.tensor(doc)
    n = X.shape[0]
    recipe = M.Recipe("sgd", 1e-4, epochs=12, batch_size=8, lr=0.05, optimizer="momentum", momentum=0.9, seed=0)

    def fresh():
        return M.make_model("gpt", 256, 256, seed=0, d_model=16, n_layers=1, n_heads=2, seq_len=T)

    model = fresh()
    assert model.num_parameters() < 100_000
    holder = {}
    rec = mu.Recorder(model, checkpoints=6, total_steps=len(M.batch_schedule(n, recipe)))
    M.train(model, X, Y, recipe, optimizer_callback=lambda opt: holder.setdefault("rec", rec.attach(opt)))
    log = rec.finalize((X, Y), lm_loss, progress=False)
    assert log.meta["fisher"] == "mc"  # V = 256 > 64
    forget = torch.nonzero(doc == 1).view(-1)
    retain = torch.nonzero(doc != 1).view(-1)
    ref = fresh()
    M.train(ref, X, Y, recipe, indices=retain)
    before = copy.deepcopy(model.state_dict())
    res = mu.unlearn(model, log, indices=forget, loss_fn=lm_loss, mode="trajectory", progress=False)
    assert res.mode == "trajectory"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.isfinite(p).all() for p in res.model.parameters())

    def doc_loss(m):
        with torch.no_grad():
            return float(lm_loss(m(X[forget]), Y[forget]))

    lo, lr, lu = doc_loss(model), doc_loss(ref), doc_loss(res.model)
    assert lr > lo  # retraining without the document fits it worse
    # measured 1.91 -> 2.62 (retraining 3.30): toward retraining, short of it on this tiny,
    # far-from-converged model; 4.00 (an overshoot) without the directional calibration
    # (docs/math.md, "Language models")
    assert abs(lu - lr) < 0.75 * abs(lo - lr), (lo, lu, lr)


def test_a_block_whose_module_never_runs_is_refused():
    """The bug class nn.MultiheadAttention had: a Linear applied functionally by its parent."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 4)

        def forward(self, x):
            return F.linear(x, self.inner.weight, self.inner.bias)

    with pytest.raises(UnsupportedTrainingError, match="saw no call"):
        run_pass(Functional(), (torch.randn(5, 3), torch.randint(0, 4, (5,))), loss=F.cross_entropy)


def test_trajectory_and_segment_spectra_with_diagonal_factors():
    """A recorded SGD-momentum run whose head G is over the bound (and an embedding's diagonal A):
    trajectory mode, with and without per-segment spectra, stays close to the dense-G result."""
    X = torch.randint(0, 40, (32, 5))
    Y = torch.roll(X, -1, 1)
    out = {}
    for bound in (None, 4 * 30 * 30):
        model = EmbNet(V=40, d=6, C_=40)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5, weight_decay=1e-3)
        rec = mu.Recorder(model, checkpoints=4, total_steps=16, fisher="ggn", max_factor_bytes=bound).attach(opt)
        for i in range(16):
            b = torch.arange(32)[(i * 8) % 32:(i * 8) % 32 + 8]
            opt.zero_grad()
            seq_loss(model(X[b]), Y[b]).backward()
            opt.step()
        log = rec.finalize((X, Y), seq_loss, progress=False, segment_spectra=16)
        assert ("kfac/out/U_G" in log) == (bound is None) and "kfac/emb/U_A" not in log
        assert log.get("seg/0/out/s_G").shape == (40,) and log.get("seg/0/emb/s_A").shape == (40,)
        res = mu.unlearn(model, log, indices=torch.arange(4), loss_fn=seq_loss, mode="trajectory", progress=False)
        out[bound] = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(res.model.parameters(),
                                                                               model.parameters())])
        assert torch.isfinite(out[bound]).all() and float(out[bound].norm()) > 0
    rel = float((out[None] - out[4 * 30 * 30]).norm() / out[None].norm())
    print("trajectory step, diagonal vs dense head G: rel diff", rel)
    assert rel < 0.5, rel
