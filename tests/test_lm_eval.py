"""Language-model metrics (mini_unlearn.lm_eval) on hand-made cases with known answers, and the
trajectory's linearity check with a diagonal (embedding) factor."""
import math

import pytest
import torch

from mini_unlearn import lm_eval as E


def test_min_k_prob_takes_the_lowest_fraction_of_real_tokens():
    logp = torch.tensor([[-0.1, -5.0, -0.2, -0.3, -3.0, 0.0],
                         [-1.0, -1.0, -1.0, -2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 5 + [False], [True] * 4 + [False] * 2])
    s = E.min_k_prob_scores(logp, mask, k=0.2)  # ceil(0.2*5) = 1 token; ceil(0.2*4) = 1 token
    assert s.tolist() == [-5.0, -2.0]
    s = E.min_k_prob_scores(logp, mask, k=0.4)  # 2 lowest: (-5,-3) and (-2,-1)
    assert s.tolist() == [-4.0, -1.5]
    assert E.min_k_prob_scores(logp, mask, k=1.0)[1].item() == pytest.approx(-1.25)
    with pytest.raises(ValueError):
        E.min_k_prob_scores(logp, mask, k=0.0)


def test_loss_score_and_perplexity_ignore_padding():
    logp = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert E.sequence_loss_scores(logp, mask).tolist() == [-2.0, -2.0]
    assert E.perplexity_of(logp, mask) == pytest.approx(math.exp(2.0))
    d = E.doc_perplexities(logp, mask, torch.tensor([0, 1]))
    assert d == {0: pytest.approx(math.exp(2.0)), 1: pytest.approx(math.exp(2.0))}


def test_auc_known_values_and_ties():
    assert E.auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert E.auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert E.auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    # 1 beats 0 of {2, 0.5}? pos {1, 3} vs neg {2, 0.5}: pairs won: (1>0.5), (3>2), (3>0.5) = 3/4
    assert E.auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.5])) == 0.75
    assert E.auc(torch.tensor([2.0, float("nan")]), torch.tensor([2.0, 1.0])) == 0.75


def test_token_logprobs_match_cross_entropy():
    torch.manual_seed(0)
    from mini_unlearn.gpt import GPT, GPTConfig, lm_loss
    m = GPT(GPTConfig(vocab_size=256, seq_len=8, d_model=16, n_layers=1, n_heads=2))
    X = torch.randint(0, 256, (3, 8))
    Y = torch.randint(0, 256, (3, 8))
    Y[2, 5:] = -100
    logp, mask = E.token_logprobs(m, X, Y, batch_size=2)
    with torch.no_grad():
        ref = float(lm_loss(m(X), Y))
    assert -float(logp[mask].mean()) == pytest.approx(ref, rel=1e-5)
    assert (logp[~mask] == 0).all()
