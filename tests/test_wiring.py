"""The scripts' own `main`, run in-process with tiny sizes, checked against independent computations of its wiring:
the network the EMaQ target reads is the EMA target (the test keeps its own EMA of the online ensemble's weights),
the test-time policy uses --test-ensemble-lambda and the target --ensemble-lambda, and online data is collected by the
UCB exploration at --temperature while the test-time policy (temperature 1) only evaluates.

Spies replace module-level functions (main looks them up by global name at call time) and call the real ones. The
online parameters are found from the optimizers main creates (the Adam whose parameters have the target network's
shapes), never from main's local names. --precision fp32 and --compile off: every comparison is exact."""

import inspect

import gymnasium as gym
import numpy as np
import torch
from conftest import make_dataset

import emaq_offline as eo
import emaq_online as eon
from behavior_model import BehaviorModel

ALPHA = 0.75  # --ema: the target moves a quarter of the way to the online weights at every update (a target that is
# the online network, one that never moves, or one that moves by alpha, not 1 - alpha, is off at the second update)
LAMBDA, TEST_LAMBDA = 0.75, 0.25  # --ensemble-lambda / --test-ensemble-lambda: different, so that a swap shows
EXACT = ["--precision", "fp32", "--compile", "off", "--cudagraphs", "off", "--no-cuda", "--ema", str(ALPHA)]
EXACT += ["--q-lr", "1e-3", "--ensemble-lambda", str(LAMBDA), "--test-ensemble-lambda", str(TEST_LAMBDA)]


class Spies:
    """Wraps module-level functions: each spy calls the real function with its name on `stack` (who is running), after
    `check(arguments by name)`; `after(arguments, output)` sees what it returned."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.stack = monkeypatch, []

    def wrap(self, owner, name, check=None, after=None):
        real = getattr(owner, name)
        signature = inspect.signature(real)

        def spy(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if check:
                check(bound.arguments)
            self.stack.append(name)
            try:
                out = real(*args, **kwargs)
            finally:
                self.stack.pop()
            if after:
                after(bound.arguments, out)
            return out

        self.monkeypatch.setattr(owner, name, spy)

    def inside(self, name) -> bool:
        return name in self.stack


def parameters_of(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def watch_the_target(monkeypatch, spies, script):
    """At every call of `script.emaq_target`, the Q network it receives must hold exactly the test's own EMA of the
    online ensemble's weights (alpha = ALPHA, updated after every step of the Q optimizer), must not be the online
    network itself, and the online weights must be what the optimizer left (nothing else writes them). `state`:
    the optimizers main made, and how many targets were checked."""
    state = dict(optimizers=[], online=None, ema=None, stepped=None, targets=0)

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            state["optimizers"].append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)

    def after_q_step(optimizer, args, kwargs):
        with torch.no_grad():
            for ema, p in zip(state["ema"], state["online"], strict=True):
                ema.lerp_(p, 1 - ALPHA)  # theta_target <- alpha theta_target + (1 - alpha) theta
        state["stepped"] = [p.detach().clone() for p in state["online"]]

    def check(arguments):
        params = list(arguments["q_target"].parameters())
        if state["online"] is None:  # the first update, before any Q step: the Q optimizer has the target's shapes
            shapes = [p.shape for p in params]
            (q_optimizer,) = [o for o in state["optimizers"] if [p.shape for p in parameters_of(o)] == shapes]
            state["online"] = parameters_of(q_optimizer)
            state["ema"] = [p.detach().clone() for p in state["online"]]  # the target starts as a copy
            q_optimizer.register_step_post_hook(after_q_step)
        online = state["online"]
        assert not any(p is q for p in params for q in online), "the target computation reads the online ensemble"
        if state["stepped"] is not None:
            assert all(torch.equal(p, s) for p, s in zip(online, state["stepped"], strict=True)), (
                "the online weights changed between Q steps (something other than the optimizer wrote them)"
            )
        for i, (p, ema) in enumerate(zip(params, state["ema"], strict=True)):
            assert torch.equal(p, ema), f"update {state['targets'] + 1}: target parameter {i} is not the EMA"
        state["targets"] += 1

    spies.wrap(script, "emaq_target", check=check)
    return state


def is_trained(net, state) -> bool:
    """Whether `net` is a network that one of main's optimizers trains (the online ensemble; not a target copy)."""
    ids = [id(p) for p in net.parameters()]
    return any(ids == [id(p) for p in parameters_of(o)] for o in state["optimizers"])


def watch_the_lambdas(spies, script):
    """Every Ensemble/TestEnsemble call: (who called it, lambda)."""
    seen = []

    def record(arguments):
        who = "policy" if spies.inside("test_time_policy") else "target" if spies.inside("emaq_target") else "other"
        seen.append((who, arguments["lam"]))

    spies.wrap(script, "ensemble", check=record)
    return seen


def watch_the_test_time_policy(spies, script, state):
    """test_time_policy runs only inside evaluate, and reads the online ensemble; returns the N of every call."""
    calls = []

    def check(arguments):
        assert spies.inside("evaluate"), "the test-time policy ran outside evaluation"
        assert is_trained(arguments["q_ensemble"], state), "the test-time policy does not read the online ensemble"
        calls.append(arguments["num_samples"])

    spies.wrap(script, "evaluate")
    spies.wrap(script, "test_time_policy", check=check)
    return calls


def test_offline_main_reads_the_ema_target_and_the_test_lambda(tmp_path, monkeypatch):
    """emaq_offline.main, 6 updates: the target network of every update is the test's own EMA of the online weights
    (a main that hands the update the online ensemble fails at the first update, one whose target never moves at the
    second); Ensemble uses --ensemble-lambda in the target and TestEnsemble --test-ensemble-lambda in Algorithm 1,
    which runs only in evaluation, with the online ensemble."""
    make_dataset("test/hopper-wiring-v0", gym.make("Hopper-v5", max_episode_steps=30), 300)
    monkeypatch.setattr(eo.signal, "signal", lambda *a: None)  # keep pytest's own handlers
    spies = Spies(monkeypatch)
    state = watch_the_target(monkeypatch, spies, eo)
    lambdas = watch_the_lambdas(spies, eo)
    policy_calls = watch_the_test_time_policy(spies, eo, state)
    flags = "--preset table3 --behavior-updates 3 --total-updates 6 --eval-every 3 --eval-episodes 2 --log-every 3 "
    flags += "--num-qs 2 --q-hidden 16 --q-layers 2 --batch-size 16 --num-samples 3 --checkpoint-every 1000"
    args = eo.cli(["--dataset-id", "test/hopper-wiring-v0", "--runs-dir", str(tmp_path), *flags.split(), *EXACT])
    summary = eo.main(args)
    assert [h[0] for h in summary["history"]] == [3, 6]
    assert state["targets"] == 6  # every update's target was checked
    assert policy_calls and set(policy_calls) == {3}  # N samples at test time
    assert {who for who, _ in lambdas} == {"policy", "target"}
    assert all(lam == (TEST_LAMBDA if who == "policy" else LAMBDA) for who, lam in lambdas), sorted(set(lambdas))


def test_online_main_explores_with_ucb_at_the_temperature_and_reads_the_ema_target(tmp_path, monkeypatch):
    """emaq_online.main, 60 steps (random until 40, an update per step from 40 on): every action stepped in the
    collecting environment after --learning-starts is what `explore` returned for it, and the buffer holds them; explore
    samples mu at --temperature, scores with --ucb-beta and the online ensemble; the test-time policy runs only in
    evaluation, at temperature 1 with --test-ensemble-lambda; the target reads the EMA target, as offline."""
    monkeypatch.setattr(eon.signal, "signal", lambda *a: None)
    spies = Spies(monkeypatch)
    state = watch_the_target(monkeypatch, spies, eon)
    lambdas = watch_the_lambdas(spies, eon)
    policy_calls = watch_the_test_time_policy(spies, eon, state)
    temperature, beta, learning_starts, total = 7.0, 0.5, 40, 60

    temperatures, last_sample = [], {}  # (who sampled mu, at which temperature); mu's last draw

    def record_temperature(arguments):
        temperatures.append((spies.stack[-1] if spies.stack else "main", arguments["temperature"]))

    spies.wrap(BehaviorModel, "sample", check=record_temperature, after=lambda a, out: last_sample.update(out=out))
    pending, stepped = [], []  # explore's output not stepped yet; (who chose it, action) of every collecting step

    def check_explore(arguments):
        assert not spies.inside("evaluate"), "explore ran inside evaluation"
        assert is_trained(arguments["q_ensemble"], state), "explore does not score with the online ensemble"

    @torch.no_grad()
    def after_explore(arguments, out):
        # eq. 67 by hand with --ucb-beta, on the candidates explore drew: mean over members + beta x population std
        candidates = last_sample["out"]
        q = arguments["q_ensemble"](arguments["obs"], candidates)
        best = (q.mean(0) + beta * q.std(0, correction=0)).argmax(-1)
        assert torch.equal(out, candidates[torch.arange(len(out)), best])
        pending.append(out.clone())

    spies.wrap(eon, "explore", check=check_explore, after=after_explore)

    real_make_envs = eon.make_envs

    def make_envs(env_id, num, *rest, **kwargs):  # the collecting environments (1; evaluation has 2): watch step()
        envs = real_make_envs(env_id, num, *rest, **kwargs)
        if num == 1:
            real_step = envs.step

            def step(actions):
                if pending:  # the action explore returned for this step, exactly
                    assert len(pending) == 1 and np.array_equal(actions, pending.pop().cpu().numpy())
                    stepped.append(("explore", actions))
                else:
                    stepped.append(("random", actions))
                return real_step(actions)

            envs.step = step
        return envs

    monkeypatch.setattr(eon, "make_envs", make_envs)
    flags = f"--env-id InvertedPendulum-v5 --total-timesteps {total} --learning-starts {learning_starts} "
    flags += "--eval-every 30 --eval-episodes 2 --behavior-preset table3 --num-qs 2 --q-hidden 16 --q-layers 2 "
    flags += f"--num-samples 3 --batch-size 16 --log-every 10 --checkpoint-every 1000 --temperature {temperature} "
    flags += f"--ucb-beta {beta}"
    result = eon.main(eon.cli([*flags.split(), "--runs-dir", str(tmp_path), *EXACT]))

    assert result["num_updates"] == total - learning_starts + 1 == state["targets"]
    kinds = [kind for kind, _ in stepped]
    assert "explore" in kinds and kinds.count("random") >= learning_starts, "collection never used explore"
    first = kinds.index("explore")
    assert all(kind == "explore" for kind in kinds[first:]) and not pending  # once learning starts, explore only
    # the buffer: the first --learning-starts transitions random, the rest explore's actions (an autoreset step
    # stores nothing), in order
    (run_dir,) = list(tmp_path.iterdir())
    stored = torch.load(run_dir / "checkpoint.pt", weights_only=True)["buffer"]["actions"][:total].numpy()
    rows = iter(range(learning_starts, total))
    row = next(rows)
    for action in [
        a for kind, a in stepped if kind == "explore"
    ]:  # the stored rows are explore's actions, in order, skipping autoreset steps
        if row is not None and np.array_equal(stored[row], action[0]):
            row = next(rows, None)
    assert row is None, f"buffer row {row} is not an action explore returned"
    # temperatures: collection at --temperature, evaluation and target at 1
    by_caller = {}
    for who, t in temperatures:
        by_caller.setdefault(who, set()).add(t)
    assert by_caller.get("explore") == {temperature}, by_caller
    assert by_caller.get("test_time_policy") == {1.0} and by_caller.get("emaq_target") == {1.0}, by_caller
    assert policy_calls and set(policy_calls) == {3}
    assert {who for who, _ in lambdas} == {"policy", "target"}
    assert all(lam == (TEST_LAMBDA if who == "policy" else LAMBDA) for who, lam in lambdas), sorted(set(lambdas))
