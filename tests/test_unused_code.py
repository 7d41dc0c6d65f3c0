"""The package's unused-code check: every public top-level function and class of
``torchtitan_nemotron3`` is used by some module, script, benchmark or test.

Read with ``ast``: a use is a name or attribute reference, an imported name, or a
string naming it (``getattr``, ``[job] config = "..."`` in a job file, a shell
script) anywhere but its own definition; listing a name in ``__all__`` is not a
use. Entry points that only a launcher calls are listed in ``ENTRY_POINTS``.
"""

import ast
import re
from pathlib import Path

import torchtitan_nemotron3

ROOT = Path(torchtitan_nemotron3.__file__).parent
REPO = ROOT.parent
SOURCES = [ROOT, REPO / "scripts", REPO / "tests", REPO / "benchmarks"]
TEXT = ["train_configs/*.toml", "*.sh", "benchmarks/*.sh"]

# Called by a launcher, not by Python code here.
ENTRY_POINTS = {
    "torchtitan_nemotron3.train.__main__.main",  # python -m torchtitan_nemotron3.train
}


def defined() -> dict[str, str]:
    """``{qualified name: name}`` of the package's public top-level defs."""
    out = {}
    for path in ROOT.rglob("*.py"):
        module = ".".join(["torchtitan_nemotron3", *path.relative_to(ROOT).with_suffix("").parts])
        module = module.removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                out[f"{module}.{node.name}"] = node.name
    return out


def _all_strings(tree) -> set[int]:
    """ids of the string constants listed in ``__all__``."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            ids |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return ids


def used_names() -> set[str]:
    names: set[str] = set()
    for base in SOURCES:
        for path in base.rglob("*.py"):
            tree = ast.parse(path.read_text())
            skip = _all_strings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Name):
                    names.add(node.id)
                elif isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.alias):
                    names.add(node.name.rsplit(".", 1)[-1])
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if id(node) not in skip:
                        names.update(re.findall(r"\w+", node.value))
    for pattern in TEXT:
        for path in REPO.glob(pattern):
            names.update(re.findall(r"\w+", path.read_text()))
    return names


def unused(defs: dict[str, str], uses: set[str]) -> list[str]:
    return sorted(q for q, name in defs.items() if name not in uses and q not in ENTRY_POINTS)


def test_the_check_finds_an_unused_function():
    defs = {"pkg.mod.used": "used", "pkg.mod.dead": "dead"}
    assert unused(defs, {"used", "other"}) == ["pkg.mod.dead"]


def test_every_public_function_is_used():
    defs = defined()
    assert "torchtitan_nemotron3.job.latest_checkpoint" in defs and len(defs) > 100
    assert unused(defs, used_names()) == []
