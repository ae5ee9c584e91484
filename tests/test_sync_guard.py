"""No host syncs on the hot paths: inside Recorder's per-step recording (hook and manual) and
inside a data pass's batch loop, Tensor.item / __float__ / __bool__ / tolist / cpu would stall a
GPU. They are made to raise there (CUDA's own sync debug mode cannot run without a GPU)."""
import contextlib

import pytest
import torch

import mini_unlearn as mu
from mini_unlearn import _batches
from mini_unlearn import models as M
from mini_unlearn.curvature import Layout, data_pass, kron_blocks

SYNCS = ("item", "__float__", "__bool__", "tolist", "cpu", "__int__")


@contextlib.contextmanager
def no_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} on the hot path")
        return f

    try:
        for name in SYNCS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _data(n=128):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
                                  lambda p: torch.optim.AdamW(p, lr=1e-3)])
def test_attached_recording_does_not_sync(make):
    model = _model()
    X, y = _data()
    opt = make(model.parameters())
    rec = mu.Recorder(model, checkpoints=4, total_steps=12).attach(opt)
    # The guard wraps the Recorder's hooks (PyTorch's own CPU Adam step reads its step counter)
    for h in rec._optim[3]:
        h.remove()

    def guarded(hook):
        def run(*args):
            with no_host_sync():
                return hook(*args)
        return run

    opt.register_step_pre_hook(guarded(rec._pre_hook))
    opt.register_step_post_hook(guarded(rec._post_hook))
    for i in range(12):
        opt.zero_grad()
        M.loss_fn(model(X[i * 10:(i + 1) * 10]), y[i * 10:(i + 1) * 10]).backward()
        opt.step()  # the hooks record, including the segment closes
    assert rec.steps == 12


def test_guard_catches_a_sync():
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        float(torch.ones(()))


def test_manual_recording_does_not_sync():
    model = _model()
    X, y = _data()
    rec = mu.Recorder(model, checkpoints=2)
    for i in range(6):
        model.zero_grad()
        M.loss_fn(model(X[i * 10:(i + 1) * 10]), y[i * 10:(i + 1) * 10]).backward()
        with no_host_sync():
            rec.step(lr=0.1)


@pytest.mark.parametrize("curvature", [False, True])
def test_data_pass_batch_loop_does_not_sync(monkeypatch, curvature):
    """The whole batch loop runs under the guard; the pass syncs once, after it."""
    model = _model()
    X, y = _data()
    layout = Layout.of(model)
    blocks, diag = kron_blocks(model, layout)
    real = _batches.batches

    def guarded(data, batch_size, device):
        with no_host_sync():
            yield from real(data, batch_size, device)
            # the last batch's work also ran under the guard (the generator resumes here after it)

    import mini_unlearn.curvature.passes as passes
    monkeypatch.setattr(passes, "batches", guarded)
    s = data_pass(model, layout, (X, y), M.loss_fn, curvature=curvature, blocks=blocks, diag_names=diag,
                  batch_size=32)
    assert s.n == 128 and s.loss > 0
