"""Named mutations and the tests that must catch them (not collected by pytest: run it as a script).

For each mutation: copy the repository's work tree to a temporary folder, replace one exact piece of text in one file
(the text must occur exactly once, or the script stops: a pattern that no longer matches is a broken check, not a
caught mutation), run the listed tests there, and print "caught" (they failed) or "SURVIVED" (they passed). A baseline
run of the same tests on an unmutated copy comes first: a test that fails without the bug catches nothing. Exit code
0 only if the baseline passes and every mutation is caught.

    python tests/mutations.py                 # every mutation
    python tests/mutations.py zero-prefix     # some, by name
    python tests/mutations.py --list          # the table of mutations and their tests

Patterns are short and anchored on stable code (calls and argument names), so that edits around them keep them valid.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRING_OFFLINE = "tests/test_wiring.py::test_offline_main_reads_the_ema_target_and_the_test_lambda"
WIRING_ONLINE = "tests/test_wiring.py::test_online_main_explores_with_ucb_at_the_temperature_and_reads_the_ema_target"
DENSITY = (
    "tests/test_behavior_model.py::test_density_of_a_3d_action_integrates_to_one_and_is_the_product_of_its_conditionals"
)
SAMPLER = (
    "tests/test_behavior_model.py::test_each_sampled_dimension_follows_the_conditional_of_the_prefix_actually_sampled"
)


@dataclass
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: list[str]


MUTATIONS = [
    Mutation(
        "offline-target-is-online",
        "emaq_offline.main hands the update the online Q ensemble as the target network (the EMA target unused)",
        "emaq_offline.py",
        "= mu, q_target",
        "= mu, q_ensemble",
        [WIRING_OFFLINE],
    ),
    Mutation(
        "offline-test-policy-ensemble-lambda",
        "emaq_offline.main passes --ensemble-lambda to the test-time policy instead of --test-ensemble-lambda",
        "emaq_offline.py",
        "args.test_ensemble_lambda, generator",
        "args.ensemble_lambda, generator",
        [WIRING_OFFLINE],
    ),
    Mutation(
        "online-target-is-online",
        "emaq_online.main hands the update the online Q ensemble as the target network (the EMA target unused)",
        "emaq_online.py",
        "= mu, q_target",
        "= mu, q_ensemble",
        [WIRING_ONLINE],
    ),
    Mutation(
        "online-test-policy-ensemble-lambda",
        "emaq_online.main passes --ensemble-lambda to the test-time policy instead of --test-ensemble-lambda",
        "emaq_online.py",
        "args.test_ensemble_lambda, generator",
        "args.ensemble_lambda, generator",
        [WIRING_ONLINE],
    ),
    Mutation(
        "online-collects-with-test-time-policy",
        "emaq_online.main collects data with the test-time policy (Algorithm 1) instead of the UCB exploration",
        "emaq_online.py",
        "= explore(",
        "= (lambda mu, q, obs, args: test_time_policy(mu, q, obs, args.num_samples, args.test_ensemble_lambda))(",
        [WIRING_ONLINE],
    ),
    Mutation(
        "explore-at-temperature-1",
        "the online exploration samples mu at temperature 1 instead of --temperature",
        "emaq_online.py",
        "temperature=args.temperature)",
        ")",
        [WIRING_ONLINE],
    ),
    Mutation(
        "log-prob-first-dimension",
        "BehaviorModel.log_prob sums the bin log-probabilities of the first action dimension only",
        "behavior_model.py",
        ".squeeze(-1).sum(-1)",
        ".squeeze(-1)[..., :1].sum(-1)",
        [DENSITY],
    ),
    Mutation(
        "zero-prefix",
        "the autoregressive sampler feeds its heads a zero prefix instead of the coordinates sampled so far",
        "behavior_model.py",
        "prefix = (actions[..., :i]",
        "prefix = 0 * (actions[..., :i]",
        [SAMPLER],
    ),
]

IGNORE = shutil.ignore_patterns(".git", "runs", "sweeps", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks")


def copy_repo(where: str) -> str:
    repo = os.path.join(where, "repo")
    shutil.copytree(ROOT, repo, ignore=IGNORE, symlinks=True)
    return repo


def apply(repo: str, mutation: Mutation):
    path = os.path.join(repo, mutation.file)
    with open(path) as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        sys.exit(
            f"mutation {mutation.name}: {mutation.old!r} occurs {count} times in {mutation.file}, not once: fix it"
        )
    with open(path, "w") as f:
        f.write(text.replace(mutation.old, mutation.new))


def run_tests(repo: str, tests: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on an unmutated copy")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.file}: {m.old!r} -> {m.new!r}\n    caught by {', '.join(m.tests)}")
        return 0

    failures = 0
    if not args.no_baseline:
        tests = sorted({t for m in chosen for t in m.tests})
        with tempfile.TemporaryDirectory(prefix="mutations_") as where:
            rc, output, seconds = run_tests(copy_repo(where), tests)
        print(f"baseline (no mutation): {'pass' if rc == 0 else 'FAIL'} in {seconds:.0f} s", flush=True)
        if rc != 0:
            print(output[-3000:])
            return 1
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="mutations_") as where:
            repo = copy_repo(where)
            apply(repo, m)
            rc, output, seconds = run_tests(repo, m.tests)
        verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR (pytest exit code {rc})")
        failures += verdict != "caught"
        print(f"{verdict:8} {m.name:40} by {' '.join(m.tests)} ({seconds:.0f} s)", flush=True)
        if verdict == "caught":  # why: the first line of pytest's error report
            why = next((line[1:].strip() for line in output.splitlines() if line.startswith("E ")), "?")
            print(f"         {why[:150]}", flush=True)
        elif verdict.startswith("ERROR"):
            print(output[-3000:])
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
