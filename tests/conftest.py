"""Shared test helpers."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vec(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of a model as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def acc(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()
