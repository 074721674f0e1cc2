"""Delta(s, N) (Section 3.3; tools/delta_curve.py) against a synthetic Q and mu where it is known in closed form."""

import numpy as np
import torch

from behavior_model import BehaviorModel
from tools.delta_curve import delta_curve


def uniform_mu(obs_dim=3):
    """mu(a|s) = Uniform[0, 1] for every s: all logits zero, so every bin is equally likely."""
    mu = BehaviorModel(obs_dim, [0.0], [1.0], state_hidden=8, embed_dim=8, head_hidden=8, head_layers=1, num_bins=16)
    with torch.no_grad():
        mu.head_out_w.zero_()
        mu.head_out_b.zero_()
    return mu


def test_delta_matches_closed_form_for_uniform_mu_and_linear_q():
    # Q(s, a) = a with a ~ U[0, 1]: max over the support is 1 and E[max of N] = N / (N + 1), so Delta = 1 / (N + 1).
    torch.manual_seed(0)
    ns = (1, 2, 5, 10, 25, 50, 100, 200, 400)
    q = lambda obs, actions: actions[..., 0].unsqueeze(0)  # noqa: E731  one member, [1, B, N]
    deltas = delta_curve(uniform_mu(), q, torch.randn(32, 3), ns, 4096, test_lambda=1.0)
    assert deltas.shape == (32, len(ns))
    expected = 1 / (np.array(ns) + 1)
    np.testing.assert_allclose(deltas.mean(0), expected, atol=0.004, rtol=0.05)
    assert (np.diff(deltas.mean(0)) < 0).all()  # harder problems fall slower; this one falls like 1/N


def test_delta_uses_test_ensemble():
    # Two members, Q1 = a and Q2 = 1 - a. lambda = 1 takes min(a, 1 - a): max 1/2 over the support, and
    # E[max of N of min(a, 1-a)] = N / (2 (N + 1)) because min(a, 1-a) ~ U[0, 1/2]: Delta = 1 / (2 (N + 1)).
    torch.manual_seed(1)
    q = lambda obs, actions: torch.stack([actions[..., 0], 1 - actions[..., 0]])  # noqa: E731
    deltas = delta_curve(uniform_mu(), q, torch.randn(16, 3), (1, 3, 9), 4096, test_lambda=1.0)
    np.testing.assert_allclose(deltas.mean(0), 1 / (2 * (np.array([1, 3, 9]) + 1)), atol=0.004, rtol=0.05)
    # lambda = 0 takes max(a, 1 - a) ~ U[1/2, 1]: the same curve, reached through the other branch.
    deltas = delta_curve(uniform_mu(), q, torch.randn(16, 3), (1, 3, 9), 4096, test_lambda=0.0)
    np.testing.assert_allclose(deltas.mean(0), 1 / (2 * (np.array([1, 3, 9]) + 1)), atol=0.004, rtol=0.05)


def test_delta_is_zero_for_a_deterministic_mu():
    # A mu with all its mass in one bin leaves nothing to gain from more samples beyond the bin's width.
    mu = uniform_mu()
    with torch.no_grad():
        mu.head_out_b[0, 0, 7] = 50.0
    q = lambda obs, actions: actions[..., 0].unsqueeze(0)  # noqa: E731
    deltas = delta_curve(mu, q, torch.randn(4, 3), (1, 10), 2048, test_lambda=1.0)
    assert (deltas < 1 / 16).all() and deltas[:, 0].mean() > deltas[:, 1].mean()
