"""The package's imports go one way: tools -> decoding -> modules -> ops -> backends -> kernels.

Every import counts, those inside functions too (a deferred import is still a dependency), and
nothing shipped imports the test oracle ``seq2seq_fast.reference``.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIRS = {"seq2seq_fast": os.path.join(ROOT, "seq2seq_fast"),
                "seq2seq_fast.kernels": os.path.join(ROOT, "kernels")}
# Lower layers never import higher ones; a layer may import itself when no cycle results.
LAYERS = {
    "seq2seq_fast.kernels": 0,
    "seq2seq_fast._C": 0,
    "seq2seq_fast.backends": 1,
    "seq2seq_fast.ops": 2,
    "seq2seq_fast.modules": 3,
    "seq2seq_fast.decoding": 4,
    "seq2seq_fast.tools": 5,
    "seq2seq_fast": 6,  # the public API in __init__ and __main__
}
ORACLE = "seq2seq_fast.reference"


def package_modules():
    """{dotted module name: source path} of every Python file shipped in the package."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, folder)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            if package == "seq2seq_fast" and prefix.startswith("seq2seq_fast.kernels"):
                continue
            for name in filenames:
                if name.endswith(".py"):
                    stem = name[:-3]
                    found[prefix if stem == "__init__" else f"{prefix}.{stem}"] = os.path.join(dirpath, name)
    return found


def imports_of(name, path, known):
    """Modules of the package that ``name`` imports anywhere in its source."""
    is_package = path.endswith("__init__.py")
    edges = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` depends on pkg.sub when it is a module, else on pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known or f"{base}.{a.name}" == "seq2seq_fast._C"
                       else base for a in node.names]
        else:
            continue
        edges.update(t for t in targets if t == "seq2seq_fast" or t.startswith("seq2seq_fast."))
    edges.discard(name)
    return edges


def layer_of(module):
    best = None
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return LAYERS[best]


def find_cycle(graph):
    """One cycle of ``graph`` ({node: set of nodes}) as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph():
    known = package_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_scan_sees_the_layers(graph):
    # The scanner must see real edges (a test that sees none could never fail).
    assert "seq2seq_fast.ops.dispatch" in graph["seq2seq_fast.modules.seq2seq"]
    assert "seq2seq_fast.backends.torch_ops" in graph["seq2seq_fast.backends.triton_ops"]
    assert "seq2seq_fast._C" in graph["seq2seq_fast.backends.extension"]
    assert {layer_of(m) for m in graph} == set(range(7))


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_go_down_the_layers(graph):
    upward = sorted(
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in graph.items() if a != ORACLE
        for b in targets if b != ORACLE and layer_of(b) > layer_of(a)
    )
    assert not upward, "\n".join(upward)


def test_nothing_shipped_imports_the_oracle(graph):
    users = sorted(a for a, targets in graph.items() if ORACLE in targets)
    assert not users, f"shipped modules importing the test oracle: {users}"
    assert not graph[ORACLE], f"the oracle must stand alone, it imports {graph[ORACLE]}"
