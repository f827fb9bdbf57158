"""The model families, one module each. A family registers its model classes under their Hugging Face
``architectures`` names with ``@register("SomeForCausalLM", ...)`` (string literals).

Which architectures there are is read from those decorators without importing the modules, so that the
user's process can check a model without loading torch; ``model_class`` imports the family it needs.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pathlib
import pkgutil

_MODELS: dict[str, type] = {}


def register(*names: str):
    """Class decorator: build the model of each architecture in ``names`` with this class."""

    def add(cls: type) -> type:
        for name in names:
            _MODELS[name] = cls
        return cls

    return add


def _registered(path: pathlib.Path) -> list[str]:
    """The architecture names of the ``@register`` decorators in the module at ``path``."""
    return [
        arg.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register"
        for arg in decorator.args
    ]


@functools.cache
def architectures() -> dict[str, str]:
    """Every supported architecture name and the module of its family."""
    folder = pathlib.Path(__path__[0])
    return {
        name: module.name
        for module in pkgutil.iter_modules(__path__)
        for name in _registered(folder / f"{module.name}.py")
    }


def model_class(architecture: str) -> type:
    """The model class of ``architecture``; a ValueError names it and lists the supported ones."""
    modules = architectures()
    if architecture not in modules:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(modules)}")
    importlib.import_module(f"{__name__}.{modules[architecture]}")
    return _MODELS[architecture]
