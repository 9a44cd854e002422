"""The architecture as tests: the layer table over every import under raycat/, the size of the top
level, the length of functions, and what `raycat --help` loads."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raycat"

# A unit (a top-level module or sub-package of raycat) imports from lower layers and from its own
# layer; the stage layer never imports sideways (score does not import teach, train or evaluate).
LAYERS = [
    {"errors", "config", "entropy", "recipes", "progress", "storage"},
    {"data", "engines", "ray_env", "preflight", "testing", "tracking"},
    {"score", "split", "teach", "train", "evaluate", "report"},
    {"pipeline", "study", "export"},
    {"cli", "tables"},
]
NO_SIDEWAYS = 2  # the index of the stage layer
LAYER_OF = {unit: index for index, layer in enumerate(LAYERS) for unit in layer}
MAX_TOP_LEVEL_MODULES = 15
MAX_FUNCTION_CODE_LINES = 80


def unit_of(module: str) -> str:
    """'raycat.train.loop' -> 'train'; 'raycat' (the package itself, e.g. __version__) -> ''."""
    return module.split(".")[1] if module.count(".") else ""


def raycat_imports(path: Path) -> list[tuple[str, int]]:
    """(imported raycat module, line) for every import in the file, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raycat":
            if node.module == "raycat":  # `from raycat import split, __version__`: modules, or the package's names
                found += [
                    (f"raycat.{alias.name}" if _is_unit(alias.name) else "raycat", node.lineno) for alias in node.names
                ]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "raycat"]
    return found


def _is_unit(name: str) -> bool:
    return (PKG / f"{name}.py").exists() or (PKG / name / "__init__.py").exists()


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_violations(edges: list[tuple[str, str, str]]) -> list[str]:
    """Each (importer module, imported module, where) that breaks the layer table, as a sentence."""
    problems = []
    for importer, imported, where in edges:
        source, target = unit_of(importer), unit_of(imported)
        if not target or source == target:
            continue
        for unit in (source, target):
            if unit not in LAYER_OF:
                problems.append(f"{where}: raycat.{unit} is in no layer of tests/test_architecture.py LAYERS")
        if source not in LAYER_OF or target not in LAYER_OF:
            continue
        if LAYER_OF[target] > LAYER_OF[source]:
            problems.append(f"{where}: {importer} (layer {LAYER_OF[source]}) imports {imported} from a higher layer")
        elif LAYER_OF[target] == LAYER_OF[source] == NO_SIDEWAYS:
            problems.append(f"{where}: stage {source} imports stage {target}")
    return problems


def repo_edges() -> list[tuple[str, str, str]]:
    edges = []
    for path in sorted(PKG.rglob("*.py")):
        importer = module_name(path)
        for imported, line in raycat_imports(path):
            edges.append((importer, imported, f"{path.relative_to(PKG.parent)}:{line}"))
    return edges


def test_every_import_under_raycat_follows_the_layer_table():
    assert layer_violations(repo_edges()) == []


def test_every_unit_of_raycat_is_in_the_layer_table():
    units = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in PKG.glob("*/__init__.py")
    }
    assert units == set(LAYER_OF), f"not in LAYERS: {units - set(LAYER_OF)}; gone: {set(LAYER_OF) - units}"


def test_the_layer_check_catches_a_sideways_stage_import_and_an_upward_import():
    edges = [
        ("raycat.score.stage", "raycat.teach.core", "a"),  # stage -> another stage
        ("raycat.storage.rundir", "raycat.engines.actor_pool", "b"),  # core layer -> engines layer
        ("raycat.data.prompts", "raycat.pipeline", "c"),  # data -> pipeline
        ("raycat.split", "raycat.report", "d"),  # two top-level stage modules
        ("raycat.score.stage", "raycat.score.core", "ok: own unit"),
        ("raycat.study.grid", "raycat.score.stage", "ok: a higher layer uses a stage"),
        ("raycat.cli", "raycat", "ok: the package itself"),
    ]
    problems = layer_violations(edges)
    assert [problem.split(":")[0] for problem in problems] == ["a", "b", "c", "d"]
    assert "stage score imports stage teach" in problems[0]
    assert "from a higher layer" in problems[1]


def test_sub_package_inits_hold_a_docstring_only():
    for init in PKG.glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init}: a docstring only, no re-exports"


def test_the_top_level_of_raycat_stays_small():
    modules = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def code_lines(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function (signature included) holding code: no blank, comment-only or docstring line."""
    docstring = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring = set(range(first.lineno, first.end_lineno + 1))
    start = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    lines = set()
    text = "\n".join(source.splitlines()[start - 1 : node.end_lineno]) + "\n"
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(textwrap.dedent(text)).readline):
        if token.type not in skip:
            lines |= set(range(token.start[0] + start - 1, token.end[0] + start))
    return len(lines - docstring)


def long_functions(limit: int) -> list[str]:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = code_lines(source, node)
                if count > limit:
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({count} code lines)")
    return found


def test_no_function_is_longer_than_the_limit():
    assert long_functions(MAX_FUNCTION_CODE_LINES) == []


def test_the_length_measure_counts_code_and_not_docstrings_or_comments():
    source = (
        'def f(a,\n      b):\n    """Doc\n    string."""\n    # a comment\n\n    x = (a +\n         b)\n    return x\n'
    )
    function = ast.parse(source).body[0]
    assert code_lines(source, function) == 5  # two signature lines, the two-line assignment, the return


def test_cli_holds_no_stage_logic_and_opens_no_ray_session():
    for name in ("cli.py", "tables.py"):
        units = {unit_of(module) for module, _ in raycat_imports(PKG / name)}
        assert not units & (LAYERS[NO_SIDEWAYS] - {"report"}) and "ray_env" not in units, (name, units)
        text = (PKG / name).read_text()
        assert "ray_session" not in text and "import ray" not in text
    pipeline = {unit_of(module) for module, _ in raycat_imports(PKG / "pipeline.py")}
    assert LAYERS[NO_SIDEWAYS] <= pipeline


def test_cli_start_does_not_import_the_stages():
    code = "import sys, raycat.cli; raycat.cli.build_parser(); print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
