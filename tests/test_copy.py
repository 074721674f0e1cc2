"""The offline script copied into another project with behavior_model.py alone (what the README invites): it trains on
a Minari dataset as it does here, and a generated id, whose generator lives in tools/, ends with one line saying so."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT, TINY, make_dataset
from test_offline import assert_clean_failure


def run_copied(folder, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "emaq_offline.py", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600, env=env)


def test_the_script_and_behavior_model_alone_train_on_a_minari_dataset(tmp_path, hopper_env):
    make_dataset("test/hopper-copy-v0", hopper_env, 400)
    for name in ("emaq_offline.py", "behavior_model.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    result = run_copied(tmp_path, "--dataset-id", "test/hopper-copy-v0", "--runs-dir", "runs", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("test/hopper-copy-v0 | mu return")
    # an id no other test generates (the session shares one Minari folder): the copy must try to generate it
    failed = run_copied(tmp_path, "--dataset-id", "emaq/Hopper-v5/random_123-v0", "--runs-dir", "runs", *TINY)
    assert_clean_failure(failed, "tools/make_random_dataset.py", "beside this script")
