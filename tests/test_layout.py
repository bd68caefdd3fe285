"""The package boundaries: what each room may import, and modules that read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# region_features is the extractor library, usable alone: from vl it takes only these leaf modules
REGION_FEATURES_MAY_IMPORT = {"vl.errors", "vl.atomic", "vl.config", "vl.progress", "vl.precision"}
MAX_LINES = 600


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("region_features"), ids=lambda p: p.name)
def test_region_features_imports_only_vl_leaf_modules(path):
    from_vl = {name for name in imported_modules(path) if name == "vl" or name.startswith("vl.")}
    assert from_vl <= REGION_FEATURES_MAY_IMPORT, f"{path.name} imports {sorted(from_vl - REGION_FEATURES_MAY_IMPORT)}"


def test_the_leaf_modules_import_nothing_else_of_vl():
    for name in REGION_FEATURES_MAY_IMPORT:
        path = ROOT / (name.replace(".", "/") + ".py")
        from_vl = {n for n in imported_modules(path) if n.startswith("vl.")}
        assert from_vl <= REGION_FEATURES_MAY_IMPORT, f"{name} imports {sorted(from_vl - REGION_FEATURES_MAY_IMPORT)}"


def test_no_module_is_over_600_lines():
    long = {str(path.relative_to(ROOT)): n for path in sources("vl", "region_features")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_bench_and_examples_use_the_installed_package_and_its_public_names():
    for path in sources("bench", "examples"):
        assert "sys.path.insert" not in path.read_text(), path.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("vl", "region_features"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
