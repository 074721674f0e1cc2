"""The README's numbers are the code's: the flag table's defaults and preset values, the presets table and the cpu
preset's paragraph are read from README.md and compared with emaq_offline's Args and PRESETS (and behavior_model's
PRESETS), so that a changed default or preset cannot leave the README stale."""

import csv
import dataclasses
import os
import re

import pytest
from conftest import ROOT

import behavior_model
import emaq_offline as eo


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def section(text: str, heading: str) -> str:
    """The text under a `## heading` or `### heading`, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(heading)}[^\n]*\n(.*?)(?=^#+ )", text, re.S | re.M)
    assert match, f"README has no section {heading!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text`, header and separator rows left out."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()]
    rows = [row for row in rows if len(row) > 1 and not set("".join(row)) <= set("-: ")]
    return rows[1:] if rows else rows


def number(text: str):
    """'1,000,000' -> 1000000, '3e-4' -> 0.0003, '0.98' -> 0.98; None for anything else."""
    text = text.strip().replace(",", "")
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def preset_args(name: str) -> eo.Args:
    """The values a run with --preset NAME starts from (what emaq_offline.cli builds)."""
    return eo.Args(**eo.PRESETS[name], preset=name)


FIELDS = {field.name for field in dataclasses.fields(eo.Args)}


def flag_rows():
    """(flags' Args fields, the default cell) of every row of the Flags table whose flags are all Args fields."""
    for row in table_rows(section(readme(), "Flags")):
        fields = [flag[2:].replace("-", "_") for flag in re.findall(r"--[a-z][a-z-]*", row[0])]
        if fields and all(field in FIELDS for field in fields):
            yield fields, row[1]


def test_the_flag_tables_defaults_and_preset_values_are_the_codes():
    """Every number in the default column (`a / b` for a row of two flags) is Args' default, every `(`PRESET`: ...)`
    value is that preset's, and a row whose flag a preset sets names that preset's value."""
    compared = 0
    for fields, cell in flag_rows():
        base, _, annotations = cell.partition("(")
        values = [number(v) for v in base.split(" / ")]
        if len(values) == len(fields):
            for field, value in zip(fields, values, strict=True):
                if value is not None:
                    assert value == getattr(eo.Args(), field), f"README: --{field} defaults to {value}"
                    compared += 1
        named = dict(re.findall(r"`(\w+)`: ([^;)]+)", annotations))
        for preset, preset_values in eo.PRESETS.items():
            if preset == "mujoco" or not set(preset_values) & set(fields):
                continue
            assert preset in named, f"README's row for {fields} does not give the {preset} preset's value"
        for preset, text in named.items():
            values = [number(v) for v in text.split(" / ")]
            assert len(values) == len(fields) and None not in values, (fields, text)
            for field, value in zip(fields, values, strict=True):
                expected = getattr(preset_args(preset), field)
                assert value == expected, f"README: --preset {preset} sets --{field} to {value}, the code to {expected}"
                compared += 1
    assert compared >= 20  # the table was found and read


def test_the_presets_table_is_the_codes():
    """The `mujoco` (Table 2) / `table3` (Table 3) table: batch size, K, Q networks, mu's bins, the shared values."""
    rows = {row[0]: row[1:] for row in table_rows(section(readme(), "Presets"))}
    for column, preset in enumerate(("mujoco", "table3")):
        args, mu = preset_args(preset), behavior_model.PRESETS[preset]
        assert number(rows["batch size"][column]) == args.batch_size
        assert number(rows["K Q functions"][column]) == args.num_qs
        assert rows["Q networks"][column].startswith(f"{args.q_layers} hidden layers of {args.q_hidden}")
        assert rows["mu"][column].endswith(f"{mu['num_bins']} bins")
    shared, args = rows["shared"][0], preset_args("table3")
    assert rows["shared"][1] == "same"
    expected = dict(q_lr=args.q_lr, behavior_lr=args.behavior_lr, ema=args.ema, ensemble_lambda=args.ensemble_lambda)
    written = re.fullmatch(r"Q lr (\S+), mu lr (\S+), EMA alpha (\S+), lambda (\S+), (\d+)M updates", shared)
    assert written, shared
    assert [number(v) for v in written.groups()[:4]] == list(expected.values())
    assert int(written.group(5)) * 1_000_000 == args.total_updates == preset_args("mujoco").total_updates


CPU_PARAGRAPH = [
    (r"Table 3's mu \((\d+)k updates\)", ["behavior_updates"], 1000),
    (r"K = (\d+) Q networks of (\d+) x (\d+)", ["num_qs", "q_layers", "q_hidden"], 1),
    (r"batch (\d+)", ["batch_size"], 1),
    (r"N = (\d+)", ["num_samples"], 1),
    (r"Q lr (\S+),", ["q_lr"], 1),
    (r"EMA (\S+),", ["ema"], 1),
    (r"(\d+)k\s+updates, the last evaluation", ["total_updates"], 1000),
    (r"over (\d+)\s+episodes", ["final_eval_episodes"], 1),
]


@pytest.mark.parametrize("pattern, fields, scale", CPU_PARAGRAPH, ids=[fields[0] for _, fields, _ in CPU_PARAGRAPH])
def test_the_cpu_presets_paragraph_is_the_codes(pattern, fields, scale):
    """`cpu` is ours: ... in the Presets section: each value it names is --preset cpu's."""
    paragraph = re.search(r"`cpu` is ours:(.*?)\n\n", section(readme(), "Presets"), re.S)
    assert paragraph, "the Presets section has no paragraph on `cpu`"
    written = re.search(pattern, paragraph.group(1))
    assert written, f"{pattern!r} not in the cpu paragraph"
    args = preset_args("cpu")
    assert [number(v) * scale for v in written.groups()] == [getattr(args, f) for f in fields]
    assert behavior_model.PRESETS["cpu"] == behavior_model.PRESETS["table3"]  # "Table 3's mu"


def test_the_random_data_table_is_the_committed_sweeps():
    """The README's random-data table (Results) is benchmarks/results/random_sweep/results.csv: every score cell its
    IQM [CI] to one decimal, the speed column Walker2d's updates/s and the ms per update they give."""
    with open(os.path.join(ROOT, "benchmarks", "results", "random_sweep", "results.csv")) as f:
        cells = {(row["dataset_id"], int(row["N"])): row for row in csv.DictReader(f)}
    table = re.search(r"^\| N \| HalfCheetah \|.*?\n\n", section(readme(), "Results"), re.S | re.M)
    assert table, "the Results section has no random-data table"
    rows = table_rows(table.group(0))
    assert [int(row[0].split()[0]) for row in rows] == [1, 2, 5, 10, 25]
    for row in rows:
        n = int(row[0].split()[0])
        for env, written in zip(("HalfCheetah", "Hopper", "Walker2d"), row[1:4], strict=True):
            cell = cells[(f"emaq/{env}-v5/random-v0", n)]
            iqm, low, high = (float(cell[k]) for k in ("last_iqm", "last_iqm_ci_low", "last_iqm_ci_high"))
            assert written.replace("**", "") == f"{iqm:.1f} [{low:.1f}, {high:.1f}]", (env, n)
        speed = float(cells[("emaq/Walker2d-v5/random-v0", n)]["updates_per_s"])
        assert row[4] == f"{speed:.1f} ({1000 / speed:.0f})", n
