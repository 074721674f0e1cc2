"""One set of checks for the flags both scripts share (check_shared_args, a verbatim copy in each script): every
impossible value below ends either script before any heavy work, with exactly one `error:` line that names the flag,
and exit code 2. The two scripts' checks once drifted (`emaq_online.py --ema 1` ran with a target that never moves).

Each script runs every row in one subprocess (runpy, as `python script.py FLAGS` runs it), so that the table costs two
interpreter starts, not one per row; the issue's own case (`--ema 1`) also runs as a plain command line. A row whose
check is missing does not hang: the dataset and the environment do not exist, so the run stops at them, with an error
line that does not name the flag."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import emaq_offline as eo
import emaq_online as eon

NOWHERE = {
    "emaq_offline.py": ["--dataset-id", "emaq/NoSuchEnv-v0/random_10-v0"],
    "emaq_online.py": ["--env-id", "NoSuchEnv-v0"],
}
SCRIPTS = list(NOWHERE)

BAD = [  # (flag, bad value, what the error line names)
    ("--ema", "1", "--ema"),  # alpha = 1: the target never moves
    ("--ema", "-0.1", "--ema"),
    ("--ema", "nan", "--ema"),
    ("--gamma", "1.5", "--gamma"),
    ("--num-samples", "0", "--num-samples"),
    ("--num-qs", "0", "--num-qs"),
    ("--q-hidden", "0", "--q-hidden"),
    ("--q-layers", "0", "--q-layers"),
    ("--batch-size", "0", "--batch-size"),
    ("--eval-episodes", "0", "--eval-episodes"),
    ("--eval-every", "0", "--eval-every"),
    ("--log-every", "0", "--log-every"),
    ("--checkpoint-every", "0", "--checkpoint-every"),
    ("--q-lr", "0", "--q-lr"),
    ("--behavior-lr", "-0.001", "--behavior-lr"),
    ("--ensemble-lambda", "2", "--ensemble-lambda"),
    ("--test-ensemble-lambda", "-1", "--test-ensemble-lambda"),
    ("--target-memory-gb", "0", "--target-memory-gb"),
    ("--cudagraphs", "on", "--cudagraphs"),  # needs --compile on and a GPU: with --compile off, never possible
]
EXTRA = {"--cudagraphs": ["--compile", "off"]}

DRIVER = """
import contextlib, io, json, runpy, sys
script, rows, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
results = []
for argv in rows:
    sys.argv = [script, *argv]
    stderr, code = io.StringIO(), None
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code = f"{type(e).__name__}: {e}"
    results.append([code, stderr.getvalue()])
json.dump(results, open(out, "w"))
"""


def argv(script, flag, value, runs_dir):
    return [*NOWHERE[script], "--runs-dir", runs_dir, flag, value, *EXTRA.get(flag, [])]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(script, flag, value): (exit code, stderr)} for every row in both scripts, and ("cli", script): the plain
    command line `python script --ema 1`; the four processes run at once."""
    where = tmp_path_factory.mktemp("flags")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = {}
    with contextlib.ExitStack() as stack:
        for script in SCRIPTS:
            rows = [argv(script, flag, value, str(where / "runs")) for flag, value, _ in BAD]
            cmd = [sys.executable, "-c", DRIVER, script, json.dumps(rows), str(where / f"{script}.json")]
            procs[("table", script)] = stack.enter_context(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
            cmd = [sys.executable, script, *argv(script, "--ema", "1", str(where / "runs"))]
            procs[("cli", script)] = stack.enter_context(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        done = {key: (proc.communicate(timeout=300), proc.returncode) for key, proc in procs.items()}
    found = {}
    for script in SCRIPTS:
        (_, stderr), code = done[("table", script)]
        assert code == 0, stderr[-3000:]
        results = json.load(open(where / f"{script}.json"))
        found |= {(script, flag, value): tuple(result) for (flag, value, _), result in zip(BAD, results, strict=True)}
        (_, stderr), code = done[("cli", script)]
        found[("cli", script)] = (code, stderr)
    return found


def assert_one_error_line(code, stderr, names):
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-2000:]
    assert names in errors[0], f"the error line does not name {names}: {errors[0]}"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag, value, names", BAD, ids=[f"{flag} {value}" for flag, value, _ in BAD])
def test_an_impossible_shared_flag_ends_either_script_with_one_error_line(outcomes, script, flag, value, names):
    assert_one_error_line(*outcomes[(script, flag, value)], names)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ema_1_on_the_command_line_is_refused(outcomes, script):
    assert_one_error_line(*outcomes[("cli", script)], "--ema")


def test_the_table_holds_only_flags_both_scripts_have():
    shared = {f.name for f in eo.dataclasses.fields(eo.Args)} & {f.name for f in eon.dataclasses.fields(eon.Args)}
    assert {flag[2:].replace("-", "_") for flag, _, _ in BAD} <= shared
