"""The model families, one module each. A family registers its model classes under their Hugging Face
``architectures`` names with ``@register("SomeForCausalLM", ...)`` (string literals), and with
``tensor_parallel=False`` where the model cannot be split over ranks.

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


def register(*names: str, tensor_parallel: bool = True):
    """Class decorator: build the model of each architecture in ``names`` with this class; ``tensor_parallel``
    False says it runs on one rank only (read by ``single_rank``, not here)."""

    def add(cls: type) -> type:
        for name in names:
            _MODELS[name] = cls
        return cls

    return add


def _decorators(path: pathlib.Path) -> list[ast.Call]:
    """The ``@register(...)`` calls in the module at ``path``."""
    return [
        decorator
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        for decorator in node.decorator_list
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register"
    ]


@functools.cache
def _families() -> dict[str, list[ast.Call]]:
    folder = pathlib.Path(__path__[0])
    return {module.name: _decorators(folder / f"{module.name}.py") for module in pkgutil.iter_modules(__path__)}


@functools.cache
def architectures() -> dict[str, str]:
    """Every supported architecture name and the module of its family."""
    return {arg.value: module for module, calls in _families().items() for call in calls for arg in call.args}


@functools.cache
def single_rank() -> set[str]:
    """The architectures registered with ``tensor_parallel=False``."""
    return {
        arg.value
        for calls in _families().values()
        for call in calls
        if any(k.arg == "tensor_parallel" and k.value.value is False for k in call.keywords)
        for arg in call.args
    }


def model_class(architecture: str) -> type:
    """The model class of ``architecture``; a ValueError names it and lists the supported ones."""
    modules = architectures()
    if architecture not in modules:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(modules)}")
    importlib.import_module(f"{__name__}.{modules[architecture]}")
    return _MODELS[architecture]
