"""The shape of a minimal reference: sizes a reader finishes in one sitting, the algorithm early in the file, every
function defined above what calls it (main may call small helpers just below it), tools that import the scripts and
never the reverse, but for the random-dataset generator that the offline script imports lazily."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["emaq_offline.py", "emaq_online.py"]
MAX_LINES = {"emaq_offline.py": 700, "emaq_online.py": 650, "behavior_model.py": 450, "README.md": 350}
SMALL_HELPER = 30  # lines: what main may call below itself


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def top_level_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}


def called_names(node: ast.AST) -> set[str]:
    """The plain names that `node` calls (f(...), not obj.f(...)), nested functions and lambdas included."""
    return {call.func.id for call in ast.walk(node) if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)}


@pytest.mark.parametrize("name", list(MAX_LINES))
def test_files_stay_within_their_size(name):
    lines = len(read(name).splitlines())  # every line, blank lines too
    assert lines <= MAX_LINES[name], f"{name} has {lines} lines, more than {MAX_LINES[name]}"


def test_a_reader_meets_eq_11_early():
    tree = ast.parse(read("emaq_offline.py"))
    assert top_level_functions(tree)["emaq_target"].lineno <= 250


@pytest.mark.parametrize("name", [*SCRIPTS, "behavior_model.py"])
def test_what_a_function_calls_is_defined_above_it(name):
    """Read top to bottom, nothing is used before it is defined: the algorithm's autocast, fail and log come first.
    main is the one exception (next test)."""
    functions = top_level_functions(ast.parse(read(name)))
    used_before = {}
    for caller, node in functions.items():
        later = sorted(callee for callee in called_names(node) if functions.get(callee, node).lineno > node.lineno)
        if later and caller != "main":
            used_before[caller] = later
    assert not used_before, f"{name}: these functions call what is defined below them: {used_before}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_calls_only_what_is_above_it_or_small_helpers_below_it(script):
    functions = top_level_functions(ast.parse(read(script)))
    main = functions["main"]
    called = called_names(main) & set(functions)
    below = {name: functions[name] for name in called if functions[name].lineno > main.lineno}
    size = {name: f.end_lineno - f.lineno + 1 for name, f in below.items()}
    assert {name for name in called if functions[name].lineno < main.lineno} >= {"emaq_update", "evaluate"}
    assert not {name: lines for name, lines in size.items() if lines > SMALL_HELPER}, (
        f"large helpers below main: {size}"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_args_field_has_a_one_line_docstring(script):
    args = top_level_functions(ast.parse(read(script)))["Args"]
    body = args.body
    fields = [(i, node.target.id) for i, node in enumerate(body) if isinstance(node, ast.AnnAssign)]
    assert len(fields) > 20
    for i, field in fields:
        doc = body[i + 1] if i + 1 < len(body) else None
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{field} has no docstring"
        assert "\n" not in doc.value.value and doc.value.value.strip(), f"{field}'s docstring is not one line"


def imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("name", [*SCRIPTS, "behavior_model.py"])
def test_the_scripts_never_import_tools_except_the_lazy_dataset_generator(name):
    """The offline script imports tools/make_random_dataset.py's generator inside load_dataset, on the first use of a
    generated id; that tool imports the script only inside its own main, so no import cycle exists."""
    tree = ast.parse(read(name))
    load_dataset = top_level_functions(tree).get("load_dataset")
    modules = set().union(*(imported_modules(node) for node in tree.body if node is not load_dataset))
    lazy = imported_modules(load_dataset) if load_dataset else set()
    assert not {m for m in modules if m.split(".")[0] in ("tools", "benchmarks")}, f"{name} imports {modules}"
    assert {m for m in lazy if m.split(".")[0] in ("tools", "benchmarks")} <= {"tools.make_random_dataset"}
    if name == "behavior_model.py":
        assert not modules & {"emaq_offline", "emaq_online"}
    if name == "emaq_offline.py":
        assert not (modules | lazy) & {"emaq_online"}


def test_the_dataset_generator_imports_the_offline_script_only_inside_its_main():
    tree = ast.parse(read(os.path.join("tools", "make_random_dataset.py")))
    functions = top_level_functions(tree)
    at_module_level = set().union(*(imported_modules(node) for node in tree.body if node is not functions["main"]))
    assert "emaq_offline" not in at_module_level and "emaq_offline" in imported_modules(functions["main"])


def test_tools_import_the_scripts():
    tools = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py") and f != "__init__.py")
    assert tools
    for name in tools:
        modules = imported_modules(ast.parse(read(os.path.join("tools", name))))
        assert modules & {"emaq_offline", "emaq_online"}, f"tools/{name} does not build on the scripts"
