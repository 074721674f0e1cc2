"""benchmarks/first_run.py: the README's first-run table, made from per-run CSVs that real runs' files give."""

import json

import numpy as np
import pytest
from conftest import TINY, run_script

from benchmarks import first_run


def test_the_first_run_table_comes_from_the_runs_csvs(tmp_path, capsys):
    """Two tiny real runs: each CSV holds mu's two baselines and every evaluation; the table averages the seeds."""
    runs, out = tmp_path / "runs", tmp_path / "csv"
    for seed in ("1", "2"):
        flags = ("--dataset-id", "emaq/Hopper-v5/random_2000-v0", "--seed", seed, "--final-eval-episodes", "3")
        result = run_script("emaq_offline.py", *flags, "--runs-dir", str(runs), *TINY)
        assert result.returncode == 0, result.stderr
    first_run.export(first_run.Export(str(runs), str(out)))
    summaries = {
        json.load(open(p.parent / "config.json"))["seed"]: json.load(open(p)) for p in runs.glob("*/summary.json")
    }
    lines = first_run.table(first_run.Table(str(out), reps=100))
    header, row = lines[2], lines[4]
    assert header == "| mu sampled (3) | mu greedy (3) | EMaQ at 20 (2) | EMaQ at 40 (3) |"
    expected = [[summaries[seed][key] for seed in (1, 2)] for key in ("mu_score", "mu_greedy_score")] + [
        [summaries[seed]["history"][i][2] for seed in (1, 2)] for i in (0, 1)
    ]
    assert row == "| " + " | ".join(f"{np.mean(v):.1f} ± {np.std(v):.1f}" for v in expected) + " |"
    assert summaries[1]["last_eval"]["score"] == pytest.approx(summaries[1]["history"][-1][2])
    assert (out / "results.md").read_text().splitlines() == lines
