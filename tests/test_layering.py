"""The architecture's layers: the product package never imports the research harness (``toy_world``), and nothing
but the tests' conftest edits ``sys.path``."""

import ast

from conftest import ROOT


PRODUCT = [
    "__init__.py",
    "__main__.py",
    "cli.py",
    "pie_bench.py",
    "pipeline_negative_prompt_inversion.py",
    *(f"attention_processors/{path.name}" for path in (ROOT / "attention_processors").glob("*.py")),
]


def _imported_modules(tree: ast.AST):
    for node in ast.walk(tree):  # lazy imports inside functions too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")


def test_the_product_never_imports_the_toy_world():
    """Not even lazily: the embedded default model is found by its path, without importing anything."""
    for name in PRODUCT:
        modules = list(_imported_modules(ast.parse((ROOT / name).read_text())))
        assert not [m for m in modules if "toy_world" in m], f"{name} imports the toy world"
    assert '"toy_world" / "model_v2"' in (ROOT / "cli.py").read_text()  # the one (lazy, path-only) reference


def test_no_sys_path_edits_outside_the_tests_conftest():
    offenders = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0].startswith(".") or relative == relative.parent / "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if ast.unparse(target) == "sys.path" if target is not None else False:
                offenders.append(f"{relative}:{node.lineno}")
    assert not offenders
