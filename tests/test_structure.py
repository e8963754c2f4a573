"""The code's shape, measured on every non-test .py file (docs/DESIGN.md "Layers", STYLE 9):

- no file over 350 lines, no function over 80 lines, no function over 6 parameters (`self` /
  `cls` not counted; `*args` and `**kwargs` count one each). Exempt from the parameter count:
  `__init__`s, SPEC 11's public functions (their signatures are the spec) and autograd
  `forward`s (one parameter per saved input);
- layers one way: utils <- datasets <- wetr <- tools / scripts (every import counted, also
  those inside functions);
- no import circles between the project's modules.

Each test lists every offender in its failure message. The checks themselves are tested on
small synthetic trees, so a checker that finds nothing because it reads nothing fails too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "datasets", "wetr", "tools", "scripts")
LAYER = {"utils": 0, "datasets": 1, "wetr": 2, "tools": 3, "scripts": 3}
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 6
SPEC_11 = {"multi_scale_cam", "cam_to_label", "refine_label", "PAR", "cle_loss", "ptc_loss",
           "class_token_loss", "seg_loss", "dense_energy_loss", "build_model", "load_weights"}


def source_files(root: Path) -> dict[str, Path]:
    """{dotted module name: path} of every .py file under the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_autograd_function(cls: ast.ClassDef) -> bool:
    return any((isinstance(b, ast.Attribute) and b.attr == "Function")
               or (isinstance(b, ast.Name) and b.id == "Function") for b in cls.bases)


def functions(tree: ast.AST):
    """(qualified name, node, exempt from the parameter count) of every function, nested ones
    included."""
    def walk(node, prefix, autograd):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.", _is_autograd_function(child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                exempt = (child.name == "__init__" or (not prefix and child.name in SPEC_11)
                          or (autograd and child.name == "forward"))
                yield f"{prefix}{child.name}", child, exempt
                yield from walk(child, f"{prefix}{child.name}.", False)
            else:
                yield from walk(child, prefix, autograd)
    yield from walk(tree, "", False)


def parameter_count(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    n = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (bool(names) and names[0] in ("self", "cls"))


def size_offenders(files: dict[str, Path], root: Path) -> list[str]:
    """Files over MAX_FILE_LINES; functions over MAX_FUNCTION_LINES or MAX_PARAMETERS."""
    bad = []
    for path in files.values():
        text = path.read_text()
        rel = path.relative_to(root)
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            bad.append(f"{rel}: {n} lines (> {MAX_FILE_LINES})")
        for name, fn, exempt in functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES:
                bad.append(f"{rel}:{fn.lineno} {name}: {length} lines (> {MAX_FUNCTION_LINES})")
            params = parameter_count(fn)
            if params > MAX_PARAMETERS and not exempt:
                bad.append(f"{rel}:{fn.lineno} {name}: {params} parameters (> {MAX_PARAMETERS})")
    return bad


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports (anywhere in the file): `from a import b` counts as
    a.b where that is a module, else as a."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + is_pkg
                base = ".".join(parts[:keep] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            # `import a.b.c` of a module that is not ours, or a name inside one: its longest
            # known prefix
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {m: imports(m, p, known) for m, p in files.items()}


def layer_offenders(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({m.split('.')[0]}) imports {d} ({d.split('.')[0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps)
            if LAYER[d.split(".")[0]] > LAYER[m.split(".")[0]]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


# ----------------------------------------------------------------------------- the tree
@pytest.fixture(scope="module")
def tree():
    files = source_files(ROOT)
    return files, import_graph(files)


def test_files_and_functions_within_limits(tree):
    files, _ = tree
    bad = size_offenders(files, ROOT)
    assert not bad, "over the structure limits (STYLE 9):\n  " + "\n  ".join(bad)


def test_layers_import_one_way(tree):
    _, graph = tree
    bad = layer_offenders(graph)
    assert not bad, "layer rule utils <- datasets <- wetr <- tools / scripts broken:\n  " + \
        "\n  ".join(bad)


def test_no_import_circles(tree):
    _, graph = tree
    found = cycles(graph)
    assert not found, "import circles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_checker_reads_the_whole_tree(tree):
    files, graph = tree
    assert {"utils.dist", "datasets.voc", "wetr.cam", "tools.session", "scripts.train_voc",
            "tools.bench.step", "datasets"} <= set(files)
    assert "wetr.cam" in graph["wetr.infer"] and "utils.dist" in graph["tools.session"]


# ----------------------------------------------------------------------------- the checker
def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_each_kind_of_offender(tmp_path):
    many = ", ".join(f"a{i}" for i in range(7))
    write(tmp_path, "utils/__init__.py", "")
    write(tmp_path, "utils/a.py", "from wetr import m\nimport utils.b\n"
          + "\n" * (MAX_FILE_LINES - 1))
    write(tmp_path, "utils/b.py", "def f():\n    from .a import x\n")
    write(tmp_path, "wetr/__init__.py", "")
    write(tmp_path, "wetr/m.py", (
        f"def wide({many}):\n    pass\n"
        f"def cle_loss({many}):\n    pass\n"            # SPEC 11: exempt
        f"class C:\n    def __init__(self, {many}):\n        pass\n"
        f"    def method(self, a1, a2, a3, a4, a5, a6):\n        pass\n"   # 6 + self: fine
        f"    def cle_loss(self, {many}):\n        pass\n"  # not the public function
        f"class G(torch.autograd.Function):\n    @staticmethod\n"
        f"    def forward(ctx, {many}):\n        pass\n"
        f"def outer():\n    def inner(*args, **kw):\n" + "        x = 1\n" * MAX_FUNCTION_LINES
        + "from tools.x import y\n"))
    for pkg in ("datasets", "tools", "scripts"):
        write(tmp_path, f"{pkg}/__init__.py", "")
    write(tmp_path, "tools/x.py", "from wetr.m import wide\n")
    files = source_files(tmp_path)
    sizes = size_offenders(files, tmp_path)
    assert f"utils/a.py: {MAX_FILE_LINES + 1} lines (> {MAX_FILE_LINES})" in sizes, sizes
    assert any(" wide: 7 parameters" in s for s in sizes), sizes
    assert any(" C.cle_loss: 7 parameters" in s for s in sizes), sizes
    assert not any(" cle_loss:" in s for s in sizes), sizes
    assert not any("__init__" in s or "forward" in s or "method" in s for s in sizes), sizes
    assert any(f"outer.inner: {MAX_FUNCTION_LINES + 1} lines" in s for s in sizes), sizes
    assert any(f"outer: {MAX_FUNCTION_LINES + 2} lines" in s for s in sizes), sizes
    graph = import_graph(files)
    assert layer_offenders(graph) == ["utils.a (utils) imports wetr.m (wetr)",
                                      "wetr.m (wetr) imports tools.x (tools)"]
    assert cycles(graph) == [["tools.x", "wetr.m"], ["utils.a", "utils.b"]]


def test_relative_imports_resolve(tmp_path):
    write(tmp_path, "wetr/__init__.py", "from .m import f\nfrom . import n\n")
    write(tmp_path, "wetr/m.py", "from .n import g\nfrom utils import dist\n")
    write(tmp_path, "wetr/n.py", "import numpy\n")
    write(tmp_path, "utils/__init__.py", "")
    write(tmp_path, "utils/dist.py", "")
    for pkg in ("datasets", "tools", "scripts"):
        write(tmp_path, f"{pkg}/__init__.py", "")
    graph = import_graph(source_files(tmp_path))
    assert graph["wetr"] == {"wetr.m", "wetr.n"}
    assert graph["wetr.m"] == {"wetr.n", "utils.dist"}
    assert graph["wetr.n"] == set()
