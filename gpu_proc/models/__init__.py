"""The model families, one module each. A family registers its model classes under their Hugging Face
``architectures`` names with ``@register``; the first lookup imports every module of this package."""

from __future__ import annotations

import functools
import importlib
import pkgutil

_MODELS: dict[str, type] = {}


def register(*names: str):
    """Class decorator: build the model of each architecture in ``names`` with this class."""

    def add(cls: type) -> type:
        for name in names:
            _MODELS[name] = cls
        return cls

    return add


@functools.cache
def architectures() -> dict[str, type]:
    """Every supported architecture name and its model class."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(_MODELS)


def model_class(architecture: str) -> type:
    """The model class of ``architecture``; a ValueError names it and lists the supported ones."""
    models = architectures()
    if architecture not in models:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(models)}")
    return models[architecture]
