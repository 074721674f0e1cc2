"""The shape of a minimal reference: sizes a reader finishes in one sitting, the algorithm early in the file, `main`
calling nothing far below it but small helpers, tools that import the scripts and never the reverse."""

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


@pytest.mark.parametrize("name", list(MAX_LINES))
def test_files_stay_within_their_size(name):
    lines = len(read(name).splitlines())  # every line, blank lines too
    assert lines <= MAX_LINES[name], f"{name} has {lines} lines, more than {MAX_LINES[name]}"


def test_a_reader_meets_eq_11_early():
    tree = ast.parse(read("emaq_offline.py"))
    assert top_level_functions(tree)["emaq_target"].lineno <= 250


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_calls_only_small_helpers_below_it(script):
    functions = top_level_functions(ast.parse(read(script)))
    main = functions["main"]
    called = {node.func.id for node in ast.walk(main) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    below = {name: functions[name] for name in called if name in functions and functions[name].lineno > main.lineno}
    large = {
        name: f.end_lineno - f.lineno + 1 for name, f in below.items() if f.end_lineno - f.lineno + 1 > SMALL_HELPER
    }
    assert below and not large, f"main calls large functions defined below it: {large}"


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


def imported_modules(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node))
    return found


@pytest.mark.parametrize("name", [*SCRIPTS, "behavior_model.py"])
def test_the_scripts_never_import_tools_except_the_lazy_dataset_generator(name):
    tree = ast.parse(read(name))
    lazy = set()
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name == "load_dataset":
            lazy |= {id(node) for _, node in imported_modules(function)}
    for module, node in imported_modules(tree):
        if module.split(".")[0] in ("tools", "benchmarks"):
            assert id(node) in lazy and module == "tools.make_random_dataset", f"{name} imports {module}"
    if name == "behavior_model.py":
        assert not {m for m, _ in imported_modules(tree)} & {"emaq_offline", "emaq_online"}


def test_tools_import_the_scripts():
    tools = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py") and f != "__init__.py")
    assert tools
    for name in tools:
        modules = {m for m, _ in imported_modules(ast.parse(read(os.path.join("tools", name))))}
        assert modules & {"emaq_offline", "emaq_online"}, f"tools/{name} does not build on the scripts"
