"""The package's layers: no import cycle among twostep's modules, and imports of twostep's own modules at the top
of files (a function-local one only with a comment on its line or the line above that says why)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "twostep"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute twostep module names an ImportFrom refers to (the module, and `from pkg import sub` submodules)."""
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _imports(top_level_only: bool):
    """{module: set of twostep modules it imports} (top level only, or every import with its line)."""
    mods = _modules()
    graph, local = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        deps = set()
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            targets = [t for t in targets if t in mods]
            if not targets:
                continue
            guarded = id(node) in top or _in_type_checking(tree, node)
            if guarded:
                deps.update(targets)
            else:
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not said:
                    local.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
        graph[name] = deps - {name}
    return graph, local


def _in_type_checking(tree, node) -> bool:
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            if any(node is c for c in ast.walk(n)):
                return True
    return False


def _cycle(graph):
    color, stack = {}, []

    def visit(u):
        color[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            # importing a package runs its __init__: the edge to a submodule also reaches its parents
            for w in [".".join(v.split(".")[:i]) for i in range(2, len(v.split(".")) + 1)]:
                if w not in graph or w == u:
                    continue
                if color.get(w) == 1 and not u.startswith(w + "."):
                    return stack[stack.index(w):] + [w]
                if not color.get(w):
                    found = visit(w)
                    if found:
                        return found
        stack.pop()
        color[u] = 2
        return None

    for u in sorted(graph):
        if not color.get(u):
            found = visit(u)
            if found:
                return found
    return None


def test_no_import_cycle_among_top_level_imports():
    graph, _ = _imports(True)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"twostep.a": {"twostep.b"}, "twostep.b": {"twostep.a"}}) is not None
    assert _cycle({"twostep.a": {"twostep.b"}, "twostep.b": set()}) is None


def test_no_unexplained_function_local_import_of_twostep():
    _, local = _imports(False)
    assert not local, "function-local imports of twostep modules without a comment saying why:\n" + "\n".join(local)


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first in its own interpreter: an import cycle that works only in one order fails."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))  # __main__ runs the CLI
    code = ("import importlib, sys\nfor n in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k == 'twostep' or k.startswith('twostep.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(n)\n")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
