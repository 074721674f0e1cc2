"""Why does a finished run of emaq_offline.py score what it scores? Diagnostics of its Q ensemble on dataset states.

    python tools/diagnose_q.py runs/<run> [runs/<run> ...] --ns 1 2 5 10 25 --temperatures 1.0 0.5 --episodes 100

For every run: Q against the discounted return-to-go in the data, the spread of Q over mu's N samples (signal)
against the ensemble's std there (noise), how often actions lie at the bounds, the selection gain of the argmax over N,
and the test-time policy's score at other test-time N, temperatures and lambdas (N = 1 is mu itself). Printed as
tables and written to runs/<run>/q_diagnostics.json (and, with --json FILE, all runs' reports to FILE).
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import emaq_offline as eo  # noqa: E402
from tools.evaluate_run import load_run  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """finished runs of emaq_offline.py (runs/<run name> ...)"""
    states: int = 2000
    """dataset states (those whose discounted return-to-go is exact) for the diagnostics"""
    ns: tuple[int, ...] = ()
    """test-time N of the evaluations; empty: the run's own N"""
    temperatures: tuple[float, ...] = (1.0,)
    """mu's temperatures at test time (1: mu itself, as the paper samples)"""
    test_lambdas: tuple[float, ...] = ()
    """lambda of TestEnsemble in the evaluations; empty: the run's own"""
    episodes: int = 100
    """evaluation episodes per setting, one vectorized environment; 0: no evaluation"""
    seed: int = 0
    """seed of the draw of states, of mu's samples and of the evaluation episodes"""
    json: str | None = None
    """also write every run's report to this file (a list)"""
    cuda: bool = True
    """use the GPU when one is present"""


def returns_to_go(dataset, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per transition, in load_transitions' order: the discounted return of the rest of the episode (the value
    of the behavior policy, which EMaQ with N = 1 estimates), and whether it is exact to 1%: a terminated episode, or
    a truncated one whose missing tail weighs gamma^(steps left) < 0.01."""
    values, exact = [], []
    for episode in dataset.iterate_episodes():
        rtg, future = [], 0.0
        for reward in reversed(np.asarray(episode.rewards, dtype=np.float64).tolist()):
            future = reward + gamma * future
            rtg.append(future)
        values.append(rtg[::-1])
        steps_left = np.arange(len(rtg), 0, -1)
        exact.append(np.full(len(rtg), bool(episode.terminations[-1])) | (gamma**steps_left < 0.01))
    return np.concatenate(values).astype(np.float32), np.concatenate(exact)


MEANING = {  # the diagnostics' one-line meanings, for the printed table
    "q_return_to_go_corr": "correlation of Q(s, a) at the data's actions with their discounted return-to-go",
    "q_minus_return_to_go": "mean of Q(s, a) - return-to-go at the data's actions",
    "candidate_spread": "std of Q over mu's N samples at a state (the signal the argmax uses)",
    "ensemble_std": "std over the K members at those samples (the noise)",
    "chosen_at_bounds": "action coordinates within 2.5% of a bound: the test-time policy's choice",
    "mu_at_bounds": "... mu's samples",
    "data_at_bounds": "... the dataset's actions",
}


@torch.no_grad()
def q_diagnostics(mu, q_ensemble, obs, actions, returns_to_go, num_samples: int, test_lambda: float, generator=None):
    """Does Q rank actions well enough for the argmax over N to pick better ones? On dataset states, with Q =
    TestEnsemble (what the test-time policy maximizes):
    - q_return_to_go_corr, q_minus_return_to_go: Q on the dataset's actions against the discounted return-to-go;
    - candidate_spread (signal) and ensemble_std (noise): the std of Q over N samples of mu at a state, and the std
      over the K members at those samples; when the noise is as large as the signal, the argmax follows the errors;
    - chosen_at_bounds, mu_at_bounds, data_at_bounds: the fraction of action coordinates within 2.5% of the action
      bounds, for the chosen action, for mu's samples and for the dataset's actions."""
    q_data = eo.ensemble(q_ensemble(obs, actions.unsqueeze(1)), test_lambda).squeeze(-1)  # [S]
    candidates = mu.sample(obs, num_samples, generator=generator)  # [S, N, A]
    q_members = q_ensemble(obs, candidates)  # [K, S, N]
    scores = eo.ensemble(q_members, test_lambda)  # [S, N]
    chosen = candidates[torch.arange(len(obs), device=obs.device), scores.argmax(-1)]
    stats = {
        "q_return_to_go_corr": torch.corrcoef(torch.stack([q_data, returns_to_go]))[0, 1],
        "q_minus_return_to_go": (q_data - returns_to_go).mean(),
        "candidate_spread": scores.std(-1).mean(),
        "ensemble_std": q_members.std(0).mean(),
    }
    for name, a in {"chosen": chosen, "mu": candidates, "data": actions}.items():
        near_a_bound = torch.minimum(a - mu.low, mu.high - a) <= 0.025 * (mu.high - mu.low)
        stats[f"{name}_at_bounds"] = near_a_bound.float().mean()
    return {key: value.item() for key, value in stats.items()}


@torch.no_grad()
def selection_gain(mu, q_ensemble, obs, ns, test_lambda: float, generator=None) -> list[list[float]]:
    """Does the argmax over N find better actions, or Q's errors? The K members are split in two halves: half A picks
    the best of N samples of mu (TestEnsemble over A), and both halves value the pick against the mean of the N
    candidates. Rows [N, apparent gain under A, held-out gain under B, log mu of the pick - of the average candidate]:
    when the held-out gain is a small part of the apparent one, the argmax mostly selects upward errors of A (the
    winner's curse); the last column says how far into mu's tails the pick goes."""
    candidates = mu.sample(obs, max(ns), generator=generator)  # [S, N, A]
    values = q_ensemble(obs, candidates)  # [K, S, N]
    half = values.shape[0] // 2
    q_a, q_b = eo.ensemble(values[:half], test_lambda), eo.ensemble(values[half:], test_lambda)
    log_mu = mu.log_prob(obs.repeat_interleave(max(ns), 0), candidates.flatten(0, 1)).view(len(obs), -1)
    rows = []
    for n in ns:
        pick = q_a[:, :n].argmax(-1, keepdim=True)
        rows.append([n, *[(q.gather(1, pick).squeeze(1) - q[:, :n].mean(1)).mean().item() for q in (q_a, q_b, log_mu)]])
    return rows


def evaluations(args: Args, config, mu, q_ensemble, normalize, dataset, device) -> list[dict]:
    """The test-time policy at every (N, temperature, lambda) asked for, on the same episodes."""
    envs, ref, rows = eo.make_eval_envs(dataset, args.episodes), eo.reference_scores(dataset), []
    for n in args.ns or [config.num_samples]:
        for temperature in args.temperatures:
            for lam in args.test_lambdas or [config.test_ensemble_lambda]:

                def policy(obs, generator, n=n, lam=lam, temperature=temperature):
                    return eo.test_time_policy(mu, q_ensemble, obs, n, lam, generator, temperature)

                returns = eo.evaluate(policy, envs, dataset.observation_space, normalize, args.seed, device)
                result = eo.evaluation_summary(returns, ref)
                rows.append(dict(test_n=n, temperature=temperature, test_lambda=lam, **result))
    envs.close()
    return rows


def diagnose(args: Args, run_dir: str, device) -> dict:
    """One run's diagnostics, selection gain and evaluations, also written to its q_diagnostics.json."""
    config, ckpt, mu, q_ensemble, normalize = load_run(run_dir, device)
    dataset = eo.load_dataset(config.dataset_id, config.seed)
    data = eo.load_transitions(dataset, config.dataset_id)[0]
    rtg, known = returns_to_go(dataset, config.gamma)
    if not known.any():
        eo.fail(f"no state of {config.dataset_id} has an exact return-to-go (every episode is cut short)")
    draw = torch.randperm(int(known.sum()), generator=torch.Generator().manual_seed(args.seed))[: args.states]
    idx = np.flatnonzero(known)[draw.numpy()]
    obs = normalize(torch.as_tensor(data["obs"][idx], device=device))
    actions, rtg = (torch.as_tensor(x[idx], device=device) for x in (data["actions"], rtg))
    lam, generator = config.test_ensemble_lambda, lambda: torch.Generator(device).manual_seed(args.seed)
    report = dict(run_dir=run_dir, step=ckpt["step"], train_n=config.num_samples, states=len(idx))
    report["diagnostics"] = q_diagnostics(mu, q_ensemble, obs, actions, rtg, config.num_samples, lam, generator())
    if config.num_qs >= 2:  # the selection gain needs two halves of the ensemble
        ns = sorted({2, 5, 10, 25, *args.ns})
        report["selection_gain"] = selection_gain(mu, q_ensemble, obs, ns, lam, generator())
    if args.episodes:
        report["evaluations"] = evaluations(args, config, mu, q_ensemble, normalize, dataset, device)
    eo.atomic_save(report, os.path.join(run_dir, "q_diagnostics.json"))
    return report


def print_report(report: dict):
    print(
        f"\n{report['run_dir']} (update {report['step']}, trained with N = {report['train_n']}), "
        f"on {report['states']} dataset states:"
    )
    for key, value in report["diagnostics"].items():
        print(f"  {key:22s} {value:10.4f}  {MEANING[key]}")
    if "selection_gain" in report:
        print(f"  {'N':>4s} {'apparent gain':>14s} {'held-out gain':>14s} {'log mu, pick - mean':>20s}")
        for n, apparent, held_out, log_mu in report["selection_gain"]:
            print(f"  {n:4d} {apparent:14.3f} {held_out:14.3f} {log_mu:20.3f}")
    for row in report.get("evaluations", []):
        score = f", score {row['score']:.1f} ± {row['score_stderr']:.1f}" if row["score"] is not None else ""
        print(
            f"  test N {row['test_n']:3d}, temperature {row['temperature']:.2f}, lambda {row['test_lambda']:.2f}: "
            f"return {row['return_mean']:.1f} ± {row['return_stderr']:.1f}{score} ({row['episodes']} episodes)"
        )


def main(args: Args) -> list[dict]:
    if not args.run_dirs:
        eo.fail("pass the run directories to diagnose: python tools/diagnose_q.py runs/<run> [runs/<run> ...]")
    if args.states < 1 or args.episodes < 0 or (args.ns and min(args.ns) < 1):
        eo.fail("--states and every --ns must be >= 1, --episodes >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    reports = []
    for run_dir in args.run_dirs:
        reports.append(diagnose(args, run_dir, device))
        print_report(reports[-1])
    if args.json:
        eo.atomic_save(reports, args.json)
    return reports


if __name__ == "__main__":
    main(tyro.cli(Args))
