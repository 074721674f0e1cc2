"""Why does EMaQ score what it scores? Diagnostics of trained runs of emaq_offline.py (README, "Medium-quality data").

For every run directory given, it loads mu (mu.pt), the trained Q ensemble (checkpoint.pt, or model.pt of
--save-model) and the run's dataset, then:
- prints Q's diagnostics on dataset states (emaq_offline.q_diagnostics: Q against the discounted return-to-go, the
  spread of Q over mu's N samples against the ensemble's std there, how often the chosen action lies at the bounds),
  and the selection gain: with the K members split in two halves, how much better one half finds its best of N than
  the average candidate, and how much of that the other half confirms;
- evaluates the test-time policy (Algorithm 1) with every test-time N and temperature asked for, on the same many
  episodes (one vectorized environment), with standard errors. N = 1 is mu itself: the sanity anchor.

  MINARI_DATASETS_PATH=../shared/datasets python benchmarks/diagnose_q.py runs/<run> [runs/<run> ...] \
      --ns 1 5 25 --temperatures 1.0 0.5 --episodes 100 --json diagnostics.json
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_sweep import cpu_model  # noqa: E402

import emaq_offline as eo  # noqa: E402
from behavior_model import BehaviorModel  # noqa: E402


@dataclass
class Args:
    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """run directories of emaq_offline.py"""
    ns: tuple[int, ...] = ()
    """test-time N of the evaluations; empty: the run's own N"""
    temperatures: tuple[float, ...] = (1.0,)
    """mu's temperatures at test time (1: mu itself, as the paper samples)"""
    test_lambdas: tuple[float, ...] = ()
    """lambda of TestEnsemble; empty: the run's own"""
    episodes: int = 100
    """evaluation episodes per setting, one vectorized environment"""
    eval_seed: int = 0
    """seed of the episodes and of mu's samples"""
    states: int = 2000
    """dataset states (with exact returns-to-go) for the Q diagnostics"""
    json: str | None = None
    """also write every row to this file"""


def load_run(run_dir: str):
    with open(os.path.join(run_dir, "config.json")) as f:
        args = eo.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    mu = BehaviorModel.load(os.path.join(run_dir, "mu.pt")).eval()
    saved = os.path.join(run_dir, "model.pt")
    saved = saved if os.path.exists(saved) else os.path.join(run_dir, "checkpoint.pt")
    state = torch.load(saved, map_location="cpu", weights_only=True)
    q_ensemble = eo.QEnsemble(mu.obs_dim, mu.act_dim, args.num_qs, args.q_hidden, args.q_layers)
    q_ensemble.load_state_dict(state["q_ensemble"])
    return args, mu.requires_grad_(False), q_ensemble.requires_grad_(False), state.get("step")


def selection_gain(mu, q_ensemble, obs, ns, test_lambda, generator) -> list[tuple[int, float, float, float]]:
    """Does the argmax over N find better actions, or Q's errors? The K members are split into two halves: half A
    picks the best of N samples of mu (TestEnsemble over A), and both halves value the pick against the mean of the N
    candidates. (N, apparent gain under A, held-out gain under B): when the held-out gain is a small part of the
    apparent one, the argmax mostly selects upward errors of A (the winner's curse). The last column is log mu of
    the pick minus that of the average candidate: how far into mu's tails the pick goes."""
    candidates = mu.sample(obs, max(ns), generator=generator)
    values = q_ensemble(obs, candidates)  # [K, S, N]
    half = values.shape[0] // 2
    q_a, q_b = eo.ensemble(values[:half], test_lambda), eo.ensemble(values[half:], test_lambda)
    log_mu = mu.log_prob(obs.repeat_interleave(max(ns), 0), candidates.flatten(0, 1)).view(len(obs), -1)
    rows = []
    for n in ns:
        pick = q_a[:, :n].argmax(-1, keepdim=True)
        gains = [(q.gather(1, pick).squeeze(1) - q[:, :n].mean(1)).mean().item() for q in (q_a, q_b, log_mu)]
        rows.append((n, *gains))
    return rows


def main():
    opts = tyro.cli(Args)
    torch.set_grad_enabled(False)
    print(f"# {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows, cache = [], {}
    for run_dir in opts.run_dirs:
        args, mu, q_ensemble, step = load_run(run_dir)
        if args.dataset_id not in cache:
            dataset = eo.load_minari_dataset(args.dataset_id, args.seed)
            cache[args.dataset_id] = dataset, eo.episodes_to_transitions(dataset, args.gamma)
        dataset, data = cache[args.dataset_id]
        obs = torch.as_tensor(data["obs"])
        mean, std = (obs.mean(0), obs.std(0) + 1e-3) if args.normalize_obs else (0.0, 1.0)
        normalize = lambda o: (o - mean) / std  # noqa: E731
        known = np.flatnonzero(data["rtg_known"])
        idx = torch.as_tensor(np.random.default_rng(0).permutation(known)[: opts.states])
        diagnostics = eo.q_diagnostics(
            mu,
            q_ensemble,
            normalize(obs[idx]),
            torch.as_tensor(data["actions"])[idx],
            torch.as_tensor(data["returns_to_go"])[idx],
            args.num_samples,
            args.test_ensemble_lambda,
            torch.Generator().manual_seed(opts.eval_seed),
        )
        print(f"\n{run_dir} (update {step}, trained with N = {args.num_samples}):")
        print("  " + ", ".join(f"{key} {value:.3f}" for key, value in diagnostics.items()))
        gains = selection_gain(
            mu,
            q_ensemble,
            normalize(obs[idx]),
            sorted({2, 5, 10, 25, *opts.ns}),
            args.test_ensemble_lambda,
            torch.Generator().manual_seed(opts.eval_seed),
        )
        print(
            "  selection gain (apparent under the picking half / held out under the other half; log mu of the pick"
            " - of the average candidate), by N: ",
            end="",
        )
        print(", ".join(f"N {n}: {a:.2f} / {b:.2f}; {c:.2f}" for n, a, b, c in gains))
        diagnostics["selection_gain"] = gains
        envs, ref = eo.make_eval_envs(dataset, opts.episodes), eo.reference_scores(dataset)
        for n in opts.ns or [args.num_samples]:
            for temperature in opts.temperatures:
                for lam in opts.test_lambdas or [args.test_ensemble_lambda]:

                    def policy(o, generator):
                        return eo.test_time_policy(mu, q_ensemble, o, n, lam, generator, temperature)

                    returns = eo.evaluate(policy, envs, dataset.observation_space, normalize, opts.eval_seed, "cpu")
                    result = eo.evaluation_summary(returns.tolist(), ref)
                    row = dict(run=run_dir, step=step, train_n=args.num_samples, test_n=n, temperature=temperature)
                    row |= dict(test_lambda=lam, **{k: v for k, v in result.items() if k != "returns"})
                    rows.append(row | {"diagnostics": diagnostics})
                    score = f", score {result['score']:.1f} ± {result['score_stderr']:.1f}" if ref else ""
                    print(
                        f"  test N {n:3d}, temperature {temperature:.2f}, lambda {lam:.2f}: return "
                        f"{result['return_mean']:.1f} ± {result['return_stderr']:.1f}{score} ({opts.episodes} episodes)"
                    )
        envs.close()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
