"""The package's import promises: the core loads torch alone, the shells load on first access."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import monai_adv

REPO_ROOT = Path(__file__).resolve().parents[1]
# Libraries the pure core must not pull in.
FOREIGN = ("monai", "ignite", "mlflow", "nibabel", "PIL")


def _loaded_after(statement: str) -> dict:
    """Run ``statement`` in a fresh interpreter from the repository root and report what it loaded."""
    probe = (
        f"{statement}\n"
        "import sys, json\n"
        "top = sorted({name.split('.')[0] for name in sys.modules})\n"
        "print(json.dumps({'top': top, 'all': sorted(sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_torch_alone():
    loaded = _loaded_after("import monai_adv.attacks\nmonai_adv.attacks.gradient_sign_attack")
    assert "torch" in loaded["top"]
    assert [name for name in FOREIGN if name in loaded["top"]] == []
    # The shells stay unloaded too.
    assert [m for m in loaded["all"] if m.startswith("monai_adv.") and not m.startswith("monai_adv.attacks")] == []


def test_package_import_is_lazy_and_subpackages_load_on_access():
    loaded = _loaded_after("import monai_adv\nassert monai_adv.__version__")
    assert "torch" not in loaded["top"] and "monai" not in loaded["top"]
    from monai_adv import data, handlers, transforms

    assert transforms.FGSMd and handlers.AdversarialAugmentationHandler and data.__name__ == "monai_adv.data"


@pytest.mark.parametrize("name", sorted(info.name for info in pkgutil.iter_modules(monai_adv.__path__)))
def test_every_module_is_reachable_as_an_attribute(name):
    # Holds for modules added later as well: nothing in monai_adv/__init__.py lists them.
    module = getattr(monai_adv, name)
    assert module.__name__ == f"monai_adv.{name}"
    assert name in dir(monai_adv)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_module"):
        monai_adv.no_such_module  # noqa: B018
    assert not hasattr(monai_adv, "_private")


@pytest.mark.parametrize("name", sorted(info.name for info in pkgutil.iter_modules(monai_adv.__path__)))
def test_every_module_has_an_api_page(name):
    # docs/api/<name>.rst documents a package and all its submodules (see docs/conf.py); a new package needs one.
    page = REPO_ROOT / "docs" / "api" / f"{name}.rst"
    assert page.is_file(), f"add {page.relative_to(REPO_ROOT)} with '.. monai-adv-api:: monai_adv.{name}'"
    assert f".. monai-adv-api:: monai_adv.{name}" in page.read_text()
