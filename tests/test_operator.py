"""The EMaQ operator's theory (Section 3.2, Theorems 3.1-3.5) checked exactly on random tabular MDPs.

The backup (eq. 5) needs E[max of N iid draws from mu(.|s') of Q(s', a')]. With the actions sorted by Q and
F_j the CDF of mu over the j lowest, P(max = j-th value) = F_j^N - F_{j-1}^N: a closed form, no sampling.
Each check is a function that raises AssertionError; the last tests show that wrong backups break them.
"""

import numpy as np
import pytest

GAMMA = 0.9


def random_mdp(seed, partial_support):
    rng = np.random.default_rng(seed)
    S, A = rng.integers(5, 21), rng.integers(3, 11)
    P = rng.dirichlet(np.full(S, 0.3), size=(S, A))  # [S, A, S']
    R = rng.uniform(-1, 1, size=(S, A))
    mu = rng.dirichlet(np.ones(A), size=S)
    if partial_support:
        # Cut mu's support: drop the unconstrained optimal action and a few others in every state, so that
        # Q*_mu (best within the support) differs from the unconstrained Q*.
        q_star = fixed_point(lambda Q: R + GAMMA * P @ Q.max(1), S, A)
        mu[np.arange(S), q_star.argmax(1)] = 0
        mu[rng.uniform(size=(S, A)) < 0.3] = 0
        empty = mu.sum(1) == 0
        mu[empty, q_star[empty].argmin(1)] = 1.0
        mu /= mu.sum(1, keepdims=True)
    return P, R, mu


def expected_max(Q, mu, n):
    """E_{a_1..a_N ~ mu(.|s)} [max_i Q(s, a_i)] for every state, exactly (closed form from mu's CDF)."""
    order = np.argsort(Q, axis=1)
    q_sorted, p_sorted = np.take_along_axis(Q, order, 1), np.take_along_axis(mu, order, 1)
    cdf = np.cumsum(p_sorted, 1)
    cdf /= cdf[:, -1:]  # exactly 1 at the top, whatever the rounding of the sum
    prob_max = cdf**n - np.concatenate([np.zeros((len(Q), 1)), cdf[:, :-1]], 1) ** n
    return (prob_max * q_sorted).sum(1)


def emaq_backup(Q, P, R, mu, n):
    """T_mu^N Q = r + gamma E_{s'} E[max over N samples of Q(s', .)]   (eq. 5)."""
    return R + GAMMA * P @ expected_max(Q, mu, n)


def fixed_point(operator, S, A, iters=600):
    Q = np.zeros((S, A))
    for _ in range(iters):  # gamma^600 ~ 1e-28: converged to machine precision
        Q = operator(Q)
    return Q


def policy_q(P, R, pi):
    """Q^pi by solving the Bellman equation Q = R + gamma P pi Q exactly."""
    S, A = R.shape
    transition = np.einsum("sat,tb->satb", P, pi).reshape(S * A, S * A)
    return np.linalg.solve(np.eye(S * A) - GAMMA * transition, R.reshape(-1)).reshape(S, A)


def best_of_n_policy(Q, mu, n):
    """pi_mu^N: the action distribution of 'sample N actions from mu, keep the one with the highest Q'."""
    order = np.argsort(Q, axis=1, kind="stable")
    cdf = np.cumsum(np.take_along_axis(mu, order, 1), 1)
    cdf /= cdf[:, -1:]
    prob = cdf**n - np.concatenate([np.zeros((len(Q), 1)), cdf[:, :-1]], 1) ** n
    pi = np.zeros_like(Q)
    np.put_along_axis(pi, order, prob, 1)
    return pi


def q_star_mu(P, R, mu):
    """Q*_mu: the optimal Q among policies that act only inside mu's support."""
    return fixed_point(lambda Q: R + GAMMA * P @ np.where(mu > 0, Q, -np.inf).max(1), *R.shape)


def delta(Q, mu, n):
    """Delta(s, N) = max_{a in supp mu} Q(s, a) - E[max over N samples of Q(s, .)]   (Theorem 3.5)."""
    return np.where(mu > 0, Q, -np.inf).max(1) - expected_max(Q, mu, n)


# ----- the checks --------------------------------------------------------------------------------
def check_contraction(backup, P, R, mu, n, rng):
    for _ in range(50):
        Q1, Q2 = rng.normal(0, 5, R.shape), rng.normal(0, 5, R.shape)
        lhs = np.abs(backup(Q1, P, R, mu, n) - backup(Q2, P, R, mu, n)).max()
        assert lhs <= GAMMA * np.abs(Q1 - Q2).max() + 1e-12


def check_fixed_point_is_q_of_best_of_n_policy(backup, P, R, mu, n):  # Theorem 3.2
    Q = fixed_point(lambda q: backup(q, P, R, mu, n), *R.shape)
    np.testing.assert_allclose(Q, policy_q(P, R, best_of_n_policy(Q, mu, n)), atol=1e-8)


def check_interpolation(backup, P, R, mu):  # Theorem 3.3
    S, A = R.shape
    np.testing.assert_allclose(fixed_point(lambda q: backup(q, P, R, mu, 1), S, A), policy_q(P, R, mu), atol=1e-8)
    errors = [
        np.abs(fixed_point(lambda q: backup(q, P, R, mu, n), S, A) - q_star_mu(P, R, mu)).max()
        for n in (1, 10, 100, 5000)
    ]
    assert errors[-1] < 1e-3 * max(1.0, errors[0]), errors
    assert all(a >= b - 1e-10 for a, b in zip(errors, errors[1:], strict=False)), errors


def check_monotone_in_n(backup, P, R, mu):  # Theorem 3.4
    qs = [fixed_point(lambda q: backup(q, P, R, mu, n), *R.shape) for n in (1, 2, 3, 5, 10, 50)]
    for lower, higher in zip(qs, qs[1:], strict=False):
        assert (higher[mu > 0] >= lower[mu > 0] - 1e-10).all()


def check_suboptimality_bound(backup, P, R, mu, n):  # Theorem 3.5, eqs. 8 and 9, with Q*_mu and with Q_mu^N in Delta
    Q_n, Q_star = fixed_point(lambda q: backup(q, P, R, mu, n), *R.shape), q_star_mu(P, R, mu)
    gap = np.abs(Q_n - Q_star).max()
    for Q in (Q_star, Q_n):
        d = delta(Q, mu, n)
        eq8, eq9 = GAMMA / (1 - GAMMA) * (P @ d).max(), GAMMA / (1 - GAMMA) * d.max()
        assert gap <= eq8 + 1e-9 and eq8 <= eq9 + 1e-12, (gap, eq8, eq9)


# ----- the tests ---------------------------------------------------------------------------------
SEEDS = [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("partial", [False, True])
def test_theorems_hold_for_the_exact_backup(seed, partial):
    P, R, mu = random_mdp(seed, partial)
    rng = np.random.default_rng(100 + seed)
    for n in (1, 3, 20):
        check_contraction(emaq_backup, P, R, mu, n, rng)  # Theorem 3.1
        check_fixed_point_is_q_of_best_of_n_policy(emaq_backup, P, R, mu, n)  # Theorem 3.2
        check_suboptimality_bound(emaq_backup, P, R, mu, n)  # Theorem 3.5
    check_interpolation(emaq_backup, P, R, mu)  # Theorem 3.3
    check_monotone_in_n(emaq_backup, P, R, mu)  # Theorem 3.4


@pytest.mark.parametrize("seed", SEEDS)
def test_partial_support_optimum_differs_from_unconstrained_optimum(seed):
    P, R, mu = random_mdp(seed, partial_support=True)
    q_star = fixed_point(lambda Q: R + GAMMA * P @ Q.max(1), *R.shape)
    q_large_n = fixed_point(lambda Q: emaq_backup(Q, P, R, mu, 5000), *R.shape)
    assert np.abs(q_star - q_star_mu(P, R, mu)).max() > 1e-2
    assert np.abs(q_large_n - q_star_mu(P, R, mu)).max() < np.abs(q_large_n - q_star).max()


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_closed_form_agrees_with_monte_carlo(seed):
    P, R, mu = random_mdp(seed, partial_support=seed % 2 == 1)
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=R.shape)
    draws = 20_000
    for n in (1, 4, 16):
        exact = expected_max(Q, mu, n)
        for s in range(len(Q)):
            samples = rng.choice(len(mu[s]), size=(draws, n), p=mu[s])
            best = Q[s][samples].max(1)
            # 4 standard errors, plus room for events too rare to appear in the draws
            assert abs(best.mean() - exact[s]) < 4 * best.std() / np.sqrt(draws) + 10 * np.ptp(Q[s]) / draws, (s, n)


# ----- wrong backups must be caught ---------------------------------------------------------------
def mean_backup(Q, P, R, mu, n):
    """Wrong: the mean under mu instead of the expected max (ignores N)."""
    return R + GAMMA * P @ (mu * Q).sum(1)


def unconstrained_max_backup(Q, P, R, mu, n):
    """Wrong: the max over all actions, ignoring mu's support and N."""
    return R + GAMMA * P @ Q.max(1)


def max_of_expectation_backup(Q, P, R, mu, n):
    """Wrong: the best single action's value weighted by the chance it is drawn at least once (forgets the rest)."""
    best = np.where(mu > 0, Q, -np.inf).argmax(1)
    p = 1 - (1 - mu[np.arange(len(Q)), best]) ** n
    return R + GAMMA * P @ (p * Q[np.arange(len(Q)), best])


@pytest.mark.parametrize("wrong", [mean_backup, unconstrained_max_backup, max_of_expectation_backup])
def test_wrong_backups_fail_the_checks(wrong):
    P, R, mu = random_mdp(0, partial_support=True)
    failures = 0
    for check in (
        lambda: check_fixed_point_is_q_of_best_of_n_policy(wrong, P, R, mu, 5),
        lambda: check_interpolation(wrong, P, R, mu),
        lambda: check_suboptimality_bound(wrong, P, R, mu, 5),
    ):
        try:
            check()
        except AssertionError:
            failures += 1
    assert failures >= 1


# ----- the same theory on the project's own code: emaq_target, ensemble, the test-time policy, BehaviorModel ----
# A tabular MDP seen through the project's interfaces: states are one-hot observations; the action space is [0, A]
# with mu's A bins as the MDP's actions (action a lies in bin floor(a)); the "Q ensemble" is a table per member.
import torch  # noqa: E402

import emaq_offline as eo  # noqa: E402
from behavior_model import BehaviorModel  # noqa: E402


class TableQ(torch.nn.Module):
    """K tabular Q functions behind QEnsemble's interface: (one-hot obs [B, S], actions [B, N, 1]) -> [K, B, N]."""

    def __init__(self, tables):
        super().__init__()
        self.tables = torch.as_tensor(np.asarray(tables), dtype=torch.float64)  # [K, S, A]

    def forward(self, obs, actions):
        states = obs.argmax(1)[:, None].expand(-1, actions.shape[1])
        bins = actions[..., 0].floor().long().clamp(0, self.tables.shape[2] - 1)
        return self.tables[:, states, bins].float()


def tabular_mu(mu_table):
    """A real BehaviorModel whose bins are the MDP's actions and whose bin probabilities are mu(a|s) exactly."""
    S, A = mu_table.shape
    mu = BehaviorModel(S, [0.0], [float(A)], state_layers=0, embed_dim=S, head_hidden=S, head_layers=1, num_bins=A)
    with torch.no_grad():
        for p in mu.parameters():
            p.zero_()
        mu.state_mlp[0].weight.copy_(torch.eye(S))  # h = one-hot(s)
        mu.head_state.weight.copy_(torch.eye(S))  # the head's hidden layer = one-hot(s) (ReLU keeps it)
        mu.head_out_w[0].copy_(torch.as_tensor(np.log(np.maximum(mu_table, 1e-300)).clip(-1e4), dtype=torch.float32))
    return mu.requires_grad_(False)


def project_expected_max(q_tables, mu, n, lam, draws, seed=0):
    """E[max of N Ensemble values] per state, estimated by averaging the project's emaq_target (r = 0, gamma = 1)."""
    K, S, A = np.shape(q_tables)
    torch.manual_seed(seed)
    next_obs = torch.eye(S).repeat_interleave(draws, 0)
    args = eo.Args(num_samples=n, ensemble_lambda=lam, gamma=1.0)
    y = eo.emaq_target(mu, TableQ(q_tables), torch.zeros(S * draws), next_obs, torch.zeros(S * draws), args)
    return y.double().view(S, draws)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 5, 50])
def test_project_target_averages_to_the_exact_expected_max_backup(n, lam):
    """The mean of emaq_target over draws = the closed-form E[max_i Ensemble(Q(s', a_i))], within 4 standard errors."""
    P, R, mu_table = random_mdp(3, partial_support=True)
    rng = np.random.default_rng(0)
    q_tables = rng.normal(0, 2, size=(2, *R.shape))  # two members that disagree: min, max and lambda all matter
    ensemble_table = lam * q_tables.min(0) + (1 - lam) * q_tables.max(0)
    samples = project_expected_max(q_tables, tabular_mu(mu_table), n, lam, draws=4000)
    exact = expected_max(ensemble_table, mu_table, n)
    error = np.abs(samples.mean(1).numpy() - exact)
    assert (error < 4 * samples.std(1).numpy() / np.sqrt(4000) + 1e-4).all(), (error, exact)


def test_iterating_the_project_target_converges_to_q_mu_n_and_the_policy_attains_it():
    """Value iteration whose expectation over s' is exact and whose max over N is the project's sampled target converges
    to Q_mu^N (the closed-form fixed point); the project's test-time policy, run on Q_mu^N, has value Q_mu^N
    (Theorem 3.2)."""
    P, R, mu_table = random_mdp(1, partial_support=True)
    mu, n, S, A = tabular_mu(mu_table), 5, *R.shape
    exact = fixed_point(lambda Q: emaq_backup(Q, P, R, mu_table, n), S, A)
    Q = np.zeros((S, A))
    for it in range(60):
        values = (
            project_expected_max(np.stack([Q, Q]), mu, n, 1.0, draws=1000 if it < 50 else 8000, seed=it).mean(1).numpy()
        )
        Q = R + GAMMA * P @ values
    assert np.abs(Q - exact).max() < 0.05 * max(1.0, np.abs(exact).max() / 10), np.abs(Q - exact).max()

    torch.manual_seed(0)
    draws = 20_000
    obs = torch.eye(S).repeat_interleave(draws, 0)
    actions = eo.test_time_policy(mu, TableQ(exact[None]), obs, n, 1.0)[:, 0].floor().long().view(S, draws)
    pi = np.stack([np.bincount(a, minlength=A) / draws for a in actions.numpy()])
    np.testing.assert_allclose(pi, best_of_n_policy(exact, mu_table, n), atol=0.02)
    np.testing.assert_allclose(policy_q(P, R, pi), exact, atol=0.1 * max(1.0, np.abs(exact).max() / 10))
