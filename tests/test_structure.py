"""The code's shape, measured on every non-test .py file (docs/DESIGN.md "Layers"):

- layers one way: utils <- datasets <- wetr <- tools / scripts (every import counted, also
  those inside functions);
- no import circles between the project's modules;
- every code name that docs/DESIGN.md shows in backticks exists in the tree.

Sizes are hints, not gates: files over ~350 lines and functions over ~80 lines or ~6 parameters
(`self` / `cls` not counted; `*args` and `**kwargs` count one each; `__init__`s, docs/METHOD.md
§11's public functions and autograd `forward`s exempt from the parameter count) are listed in a
warning, a question for the reader ("two jobs here?") whose answer may be no. Nothing fails on a
size.

Each test lists every offender in its failure message. The checks themselves are tested on
small synthetic trees, so a checker that finds nothing because it reads nothing fails too.
"""
from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "datasets", "wetr", "tools", "scripts")
LAYER = {"utils": 0, "datasets": 1, "wetr": 2, "tools": 3, "scripts": 3}
# Size hints: past these a file or function is worth a second look, nothing more.
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 6
# docs/METHOD.md §11: their signatures are the public API, exempt from the parameter hint
PUBLIC_API = {"multi_scale_cam", "cam_to_label", "refine_label", "PAR", "cle_loss", "ptc_loss",
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
                exempt = (child.name == "__init__" or (not prefix and child.name in PUBLIC_API)
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
    """Files over MAX_FILE_LINES; functions over MAX_FUNCTION_LINES or MAX_PARAMETERS (hints)."""
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


def test_report_sizes(tree):
    """Reports the files and functions past the size hints, and the five longest files; asserts
    nothing about sizes (a file that is long because its job is long stays long)."""
    files, _ = tree
    longest = sorted(((len(p.read_text().splitlines()), p.relative_to(ROOT))
                      for p in files.values()), reverse=True)[:5]
    lines = [f"{n} lines: {rel}" for n, rel in longest] + size_offenders(files, ROOT)
    # a plain UserWarning: pytest-xdist re-creates a warning in the controller by its class
    warnings.warn(UserWarning("sizes (hints, never gates):\n  " + "\n  ".join(lines)))


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
        f"def cle_loss({many}):\n    pass\n"            # docs/METHOD.md §11: exempt
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


# ----------------------------------------------------------------------------- docs/DESIGN.md
DOC_FILE_SUFFIXES = ("json", "jsonl", "log", "md", "gz", "png", "npz", "npy", "txt", "pth", "yaml",
                     "sh", "jpg", "csv", "tar")


def symbols(files: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: its top-level names}, {class name: its members}): defs, classes, assignments
    and imports at the top; a class's methods, class-level names and `self.x =` attributes."""
    modules, classes = {}, {}
    for module, path in files.items():
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        members.add(sub.target.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                            and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        members.add(sub.attr)
        modules[module] = names
    return modules, classes


def config_keys() -> set[str]:
    """Every key and section of the training and tool schemas (`data.num_classes`, `cam`)."""
    from tools.config import InferConfig
    from utils.config import leaf_fields
    from wetr.config import TrainConfig

    keys = set()
    for schema in (TrainConfig, InferConfig):
        for key, _ in leaf_fields(schema):
            parts = key.split(".")
            keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return keys


def _expand(token: str) -> list[str]:
    """`tools/infer_{cam,lam}.py` -> both names."""
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [x for alt in m.group(1).split(",")
            for x in _expand(token[:m.start()] + alt + token[m.end():])]


def unresolved_names(text: str, root: Path, files: dict[str, Path]) -> list[str]:
    """The code names in `text`'s backticks that do not exist in the tree: `path/file.py` and
    `file.py`; dotted names whose head is a package, a module's short name or a class
    (`wetr.cam.multi_scale_cam`, `run.preflight`, `CRFStep.label_map`), unless a config key;
    a name called or mapped (`train_step(...)`, `open_context -> Context`) or private
    (`_loop`): a def, class or class member somewhere."""
    modules, classes = symbols(files)
    short = {}
    for m in modules:
        short.setdefault(m.rpartition(".")[2], []).append(m)
    defined = set(classes).union(*modules.values(), *classes.values())
    basenames = {p.name for p in files.values()}
    keys = config_keys()
    bad = []
    for span in re.findall(r"`([^`\n]+)`", text):
        for path in re.findall(r"[\w./{},-]+\.py\b", span):
            for p in _expand(path):
                if not ((root / p).is_file() if "/" in p else p in basenames):
                    bad.append(p)
        rest = re.sub(r"[\w./{},-]+\.py\b", " ", span)
        for name in re.findall(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", rest):
            head, *tail = name.split(".")
            if tail[-1] in DOC_FILE_SUFFIXES or name in keys:
                continue
            if head in PACKAGES or head in short or head in classes:
                if not _resolves(name, modules, classes, short):
                    bad.append(name)
        lead = re.match(r"\s*([A-Za-z_]\w*)(\(|\s*->|$)", rest)
        if lead and (lead.group(2) or lead.group(1).startswith("_")) \
                and lead.group(1) not in defined:
            bad.append(lead.group(1))
    return sorted(set(bad))


def _resolves(name: str, modules, classes, short) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):   # the longest module prefix, full or short
        head = ".".join(parts[:i])
        for module in ([head] if head in modules else short.get(head, []) if i == 1 else []):
            rest = parts[i:]
            if not rest:
                return True
            if rest[0] in modules[module] and (
                    len(rest) == 1 or (len(rest) == 2 and rest[1] in classes.get(rest[0], ()))):
                return True
    return len(parts) == 2 and parts[1] in classes.get(parts[0], ())


def test_design_names_exist(tree):
    files, _ = tree
    bad = unresolved_names((ROOT / "docs" / "DESIGN.md").read_text(), ROOT, files)
    assert not bad, "docs/DESIGN.md names what the code does not have:\n  " + "\n  ".join(bad)


def test_design_name_checker(tree):
    files, _ = tree
    text = ("`wetr.cam.multi_scale_cam` `run.preflight` `CRFStep.label_map` `data.num_classes` "
            "`tools/infer_{cam,lam}.py` `session.py` `scores.json` `train_step(t, b)` "
            "`open_context -> Context` `_next_batch` `torch.unique` "
            "`wetr.cam.no_such` `run.no_such` `CRFStep.no_such` `tools/no_such.py` "
            "`no_such.py` `no_such(x)` `_no_such` `no_such -> X`")
    assert unresolved_names(text, ROOT, files) == sorted(
        ["wetr.cam.no_such", "run.no_such", "CRFStep.no_such", "tools/no_such.py", "no_such.py",
         "no_such", "_no_such"])
