"""pyproject.toml ships every package of the tree (a missing one only fails after a real install)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(meta["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "wlbtrain").rglob("__init__.py")}
    found |= {"wlbtrain.kernels"} if (ROOT / "kernels" / "__init__.py").exists() else set()
    assert found == listed
    assert meta["package-dir"] == {"wlbtrain.kernels": "kernels"}
