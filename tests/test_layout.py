"""The house rules of DESIGN.md that a reader relies on to find things: small modules, no import
circles, and no WebUI, ldm, sgm or gradio import outside ``lib_identity/webui`` at import time."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "lib_identity")
MAX_LINES = 400
HOST_MODULES = ("modules", "ldm", "sgm", "gradio")


def _modules():
    """Dotted module name -> path, for every module of lib_identity (a package is its __init__)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    package = module if MODULES[module].endswith("__init__.py") else module.rsplit(".", 1)[0]
    parts = package.split(".")
    if node.level:
        parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(module: str, *, top_level_only: bool = False):
    """(target module, at import time?) for every import of ``module``, function-level ones too."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
        at_import = id(node) in top
        if top_level_only and not at_import:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, at_import
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node) if node.level else node.module
            for alias in node.names:
                yield (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base), at_import


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circles():
    graph = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a circle: drop edges into one's own package
    for m, targets in graph.items():
        graph[m] = {t for t in targets if not (MODULES[t].endswith("__init__.py") and m.startswith(t + "."))}
    state, path, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_host_imports_outside_webui_at_import_time():
    bad = {m: [t for t, _ in _imports(m, top_level_only=True) if t.split(".")[0] in HOST_MODULES]
           for m in MODULES if not m.startswith("lib_identity.webui")}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"only lib_identity.webui may import the WebUI, ldm, sgm or gradio at import time: {bad}"
