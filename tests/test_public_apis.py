"""monai_adv uses other libraries (MONAI, Ignite, MLflow, torch) through their public APIs only.

Read from the source with ``ast``: no ``obj._private`` on anything but ``self``/``cls``, and a class that
derives from another library's class only touches ``self._name`` attributes that it defines itself
(a ``self._name = ...`` assignment or a method of that name in the class), not its base class's internals.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_adv"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Protected members that a base class hands to its subclasses by design, each with why it is used.
SUBCLASS_PROTOCOL = {
    # monai.transforms.RandomizableTransform.randomize() sets it; every MONAI Rand*d transform reads it so.
    "_do_transform",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign_private_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        defined = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    defined.add(target.attr)
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
                and node.attr not in defined
                and node.attr not in SUBCLASS_PROTOCOL
            ):
                found.append(f"line {node.lineno}: {ast.unparse(node)} (not defined in class {cls.name})")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_attribute_of_another_library(path: Path):
    uses = _foreign_private_uses(ast.parse(path.read_text(), filename=str(path)))
    assert not uses, f"{path}: private attributes of other objects: {uses}"


def test_the_check_sees_a_private_use():
    code = "class H(Handler):\n    def f(self, engine):\n        engine._event_handlers\n        self._log_params()\n"
    assert len(_foreign_private_uses(ast.parse(code))) == 2
