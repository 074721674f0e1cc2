"""The two scripts each hold their own copy of the code they share (CleanRL's rule: one file, read top to bottom).
Every copy must stay identical to emaq_offline.py's, so that a fix in one reaches the other (the online target once
drifted: no soft backup, no chunking, no speed path). Where a difference is needed, it is a parameter."""

import inspect

import pytest

import behavior_model
import emaq_offline as eo
import emaq_online as eon

ALGORITHM = ["QEnsemble", "ensemble", "emaq_target", "emaq_update", "test_time_policy", "evaluate", "flatten_obs"]
SPEED = ["resolve_speed_flags", "autocast", "target_states_per_chunk", "compile_update"]
PLUMBING = ["log", "fail", "atomic_save", "stop_if_nonfinite", "check_shared_args"]
SHARED_FUNCTIONS = ALGORITHM + SPEED + PLUMBING
SHARED_CONSTANTS = ["Q_OUTPUT", "CPU_TARGET_ROWS"]
FROM_BEHAVIOR_MODEL = ["bf16_copy", "MU_OUTPUT", "fp32_output_layer", "action_bounds"]  # one copy, imported by both


@pytest.mark.parametrize("name", SHARED_FUNCTIONS)
def test_shared_functions_have_the_same_source_in_both_scripts(name):
    assert inspect.getsource(getattr(eon, name)) == inspect.getsource(getattr(eo, name))


@pytest.mark.parametrize("name", SHARED_CONSTANTS)
def test_shared_constants_are_equal(name):
    assert getattr(eon, name) == getattr(eo, name)


@pytest.mark.parametrize("name", FROM_BEHAVIOR_MODEL)
def test_what_behavior_model_holds_for_both_scripts_is_imported_not_copied(name):
    assert getattr(eo, name) is getattr(behavior_model, name) is getattr(eon, name)


def test_the_online_update_calls_the_shared_target_and_update():
    """The online main builds its update from the shared pieces, not from a copy of eq. 11 of its own."""
    source = inspect.getsource(eon.main)
    assert "emaq_update(q_batch, mu_read, q_target_read" in source and "compile_update(update, args)" in source
    assert "emaq_target(" in inspect.getsource(eon.emaq_update) and ".max(-1)" not in source
