"""dvc.yaml's code deps cannot drift from what each stage's verb imports.

A stage reruns when one of its deps changes, so every project file its ``masksam`` verb can
import (at module level or inside a function) must be a dep, or an edit to it leaves the stage's
outputs stale. The closure is computed from the source with ``ast``, the way Python resolves
``masksam.*`` imports to this checkout's files.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the installed package name -> the source folder it maps to (pyproject's package-dir)
PACKAGE_DIRS = {"masksam.model": "model", "masksam.components": "components",
                "masksam.pipelines": "pipelines", "masksam": "masksam"}
SERVED_MODULE = "masksam.components._pyfunc"


def module_file(module: str) -> Path | None:
    """The source file of a ``masksam.*`` module in this checkout (package -> its __init__)."""
    for prefix, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):].lstrip(".").split(".") if module != prefix else []
            base = ROOT / folder / Path(*rest) if rest else ROOT / folder
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py")
            if (base / "__init__.py").is_file():
                return base / "__init__.py"
            return None
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    for prefix, folder in PACKAGE_DIRS.items():
        if rel.parts[0] == folder:
            parts = list(rel.with_suffix("").parts[1:])
            if parts and parts[-1] == "__init__":
                parts.pop()
            return ".".join([prefix, *parts])
    raise ValueError(path)


def imported_modules(path: Path) -> set[str]:
    """``masksam.*`` modules that ``path`` imports anywhere (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m == "masksam" or m.startswith("masksam.")}


def import_closure(module: str) -> set[Path]:
    """Every project file reachable from ``module`` by imports, parents' __init__ included."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return seen


def verb_module(cmd: str) -> str:
    """The module a ``masksam VERB ...`` stage command runs (the CLI's own rule)."""
    from masksam.cli import _module_of

    words = shlex.split(cmd)
    assert words[0] == "masksam", f"stage command does not run a masksam verb: {cmd}"
    verb = next(w for w in words[1:] if not w.startswith("-"))
    module = _module_of(verb)
    assert module is not None, f"unknown verb in {cmd}"
    return module


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages, a ``foreach`` stage by its ``do`` template."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_stage_deps_cover_the_import_closure_of_its_verb(stage: str) -> None:
    spec = _stages()[stage]
    files = import_closure("masksam.cli") | import_closure(verb_module(spec["cmd"]))
    if stage == "register":  # the registered model runs the pyfunc's code when it is served
        files |= import_closure(SERVED_MODULE)
    deps = [str(d) for d in spec.get("deps", [])]
    missing = sorted(p.relative_to(ROOT).as_posix() for p in files if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage '{stage}' misses deps its verb imports: {missing}"


def test_closure_follows_lazy_and_relative_imports() -> None:
    """The closure helper itself: evaluate reaches _resample only through a function-level
    import chain (evaluate -> predictor -> preprocess -> _resample); the served pyfunc reaches
    the predictor and its sliding window."""
    evaluate = {p.relative_to(ROOT).as_posix() for p in import_closure("masksam.components.evaluate")}
    assert "components/_resample.py" in evaluate
    assert "components/_io.py" in evaluate
    served = {p.relative_to(ROOT).as_posix() for p in import_closure(SERVED_MODULE)}
    assert {"components/predictor.py", "components/_sliding_window.py"} <= served


@pytest.mark.parametrize("baselines, expected", [([], set()), (["nnunet"], {"baseline@nnunet", "compare@nnunet"})])
def test_compare_baselines_switch_the_comparison_stages(tmp_path: Path, baselines, expected) -> None:
    """compare.baselines drives the baseline and compare stages: none in the demo, one pair per
    reference method otherwise (DVC cannot switch a stage on a boolean; an empty foreach can)."""
    import subprocess
    import sys

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["compare"]["baselines"] = baselines
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert {s for s in out if s.startswith(("baseline", "compare"))} == expected
    assert {"data", "train", "export", "evaluate", "register"} <= set(out)
