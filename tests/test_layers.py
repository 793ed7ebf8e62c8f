"""The packages are layers, and no module imports itself through others. Every import counts, those inside
functions too: an import moved into a function hides a dependency, it does not remove it.

    model/       the model, decoding, training and evaluation in this process; no other package of ours
    export/      ONNX export, the ONNX Runtime and TensorRT backends; model/
    service/     the server; model/ and export/, never the client
    client/      clients of a running server; model/ (scenes, scoring) and, of the server's package, only the
                 gRPC stub loader service/protos.py, which imports nothing of ours
    benchmarks/  measures all of the above
    locca/       the command line (`locca COMMAND`), above every package; nothing imports it
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "export", "service", "client", "benchmarks", "locca")
FORBIDDEN = {  # package -> the packages of ours it must not import
    "model": {"export", "service", "client", "benchmarks", "locca"},
    "export": {"service", "client", "benchmarks", "locca"},
    "service": {"client", "benchmarks", "locca"},
    "client": {"export", "benchmarks", "locca"},
    "benchmarks": {"locca"},
    "locca": set(),
}
CLIENT_MAY_REACH = {"service.protos"}  # of service/: the stub loader (client/sdk.py's gRPC client)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module of ours it imports
    path: str
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.source} imports {self.target} ({self.path}:{self.line}: {self.statement})"


def modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(root: Path = ROOT, packages=PACKAGES) -> list[Import]:
    """Every import of a module of ours by a module of ours, wherever it stands in the file. `from p import m`
    imports module p.m where there is one (else p); `import p.m.x` the longest of p.m.x, p.m, p that exists."""
    known = modules(root, packages)
    out = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per dot after the first
                    up = package.split(".")
                    base = ".".join(up[:len(up) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    out.append(Import(name, target, str(path.relative_to(root)), node.lineno, ast.unparse(node)))
    return out


def package_of(module: str) -> str:
    return module.partition(".")[0]


def cycles(edges: list[Import]) -> list[tuple[list[str], list[Import]]]:
    """Each group of modules that import one another (a strongly connected component), sorted, and one cycle
    through it."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, ()):
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:  # v is the first of its group: the group is the stack down to v
            group = set()
            while v not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(sorted(group), path_back(graph, min(group), min(group), group)) for group in groups]


def path_back(graph: dict[str, list[Import]], start: str, goal: str, within: set[str] | None = None) -> list[Import]:
    """The shortest chain of imports from `start` that reaches `goal` (through `within` only, if given)."""
    came: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for e in graph.get(v, ()):
            if (within is None or e.target in within) and e.target not in came:
                came[e.target] = e
                if e.target == goal:
                    chain = [e]
                    while chain[0].source != start:
                        chain.insert(0, came[chain[0].source])
                    return chain
                queue.append(e.target)
    return []


def test_no_package_imports_a_layer_above_or_beside_it():
    wrong = [f"{e}: {package_of(e.source)}/ may not import {package_of(e.target)}/" for e in imports()
             if package_of(e.target) in FORBIDDEN[package_of(e.source)]]
    assert not wrong, "\n".join(wrong)


def test_the_client_reaches_nothing_of_the_server():
    """Through any chain of imports: a client must run without the server's code (FastAPI, the engine)."""
    graph: dict[str, list[Import]] = {}
    for e in imports():
        graph.setdefault(e.source, []).append(e)
    ours = modules()
    server = sorted(m for m in ours if package_of(m) == "service" and m not in CLIENT_MAY_REACH)
    wrong = []
    for start in (m for m in ours if package_of(m) == "client"):
        for module in server:
            if chain := path_back(graph, start, module):
                wrong.append(f"{start} reaches {module}:\n  " + "\n  ".join(map(str, chain)))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(imports())
    assert not found, "\n".join(f"{', '.join(group)} import one another, e.g.:\n  " + "\n  ".join(map(str, cycle))
                                 for group, cycle in found)


def test_imports_inside_functions_count(tmp_path):
    """The checks see what a function imports: a cycle hidden that way is found, with the import named."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    ((group, cycle),) = cycles(imports(tmp_path, ("pkg",)))
    assert group == ["pkg.a", "pkg.b"] and [str(e) for e in cycle] == ["pkg.a imports pkg.b (pkg/a.py:1: from . import b)",
                                       "pkg.b imports pkg.a (pkg/b.py:2: from .a import g)"]
