"""The layout as docs/architecture.md draws it: each layer of blip2lab imports only the
layers below it (formats depend on the model, never the reverse), and no module imports
another that imports it back, not even from inside a function."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "blip2lab"

# Lowest first; a module may import its own layer and those before it, never those after.
LAYERS = [
    {"blip2lab.config", "blip2lab.dtypes", "blip2lab.dist", "blip2lab.paths"},
    {"blip2lab.decoding"},
    {"blip2lab.model"},
    {"blip2lab.images", "blip2lab.processor"},
    {"blip2lab.formats"},
    {"blip2lab.explain"},
    {"blip2lab.pipeline", "blip2lab.chat", "blip2lab.training", "blip2lab.evaluate", "blip2lab.evaluation",
     "blip2lab.serving"},
    {"blip2lab.search"},
    {"blip2lab.worlds"},
    {"blip2lab.routing"},  # which world's shipped model answers an image
    {"blip2lab.cli", "blip2lab.__main__", "blip2lab"},  # the package's own __init__ hands out blip2lab.load
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + ([mod] if node.module else [])
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not t.startswith(name + "."):
                found.add(t)
    return found


def _layer(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer if top != "blip2lab"):
            return i
    assert module == "blip2lab", f"{module} is in no layer of LAYERS: add it (and to docs/architecture.md)"
    return len(LAYERS) - 1


GRAPH = {m: _imports(m, p, set(_modules())) for m, p in _modules().items()}


def test_every_import_points_down():
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
                    for m, targets in GRAPH.items() for t in targets
                    if t != "blip2lab" and _layer(t) > _layer(m))
    assert upward == []


def test_no_import_cycle():
    # a package's __init__ gathering its own submodules is not a cycle
    graph = {m: {t for t in ts if t != "blip2lab" and not t.startswith(m + ".")} for m, ts in GRAPH.items()}
    cycles, seen = [], set()

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen.add(node)

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert cycles == []


def test_the_model_reads_no_file_format():
    """The boxes of Figure 2 know nothing of checkpoints, sources, recipes or serving."""
    for m, targets in GRAPH.items():
        if m.startswith("blip2lab.model"):
            assert not [t for t in targets if t.startswith(("blip2lab.formats", "blip2lab.pipeline",
                                                            "blip2lab.worlds", "blip2lab.training"))], m
