"""Models: one file per model, found by name through one registry.

A model file defines a `CTRModel` subclass with a unique `name` and decorates it with `@register_model`. Nothing
else needs editing: `build_model` imports every module of this package the first time it meets a name it does not
know, so the CLI, the pipeline, the benchmark and `load_model_artifact` see a new model as soon as its file exists.
Keep heavy imports (text encoders, ...) inside functions: every model module is imported on discovery.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping

from ctrflow.data.encoding import FeatureEncoder
from ctrflow.models.base import CTRModel, to_tensors

MODELS: dict[str, type[CTRModel]] = {}
_NOT_MODELS = {"base", "blocks"}
_discovered = False


def register_model(cls: type[CTRModel]) -> type[CTRModel]:
    """Class decorator: make a model buildable by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, CTRModel)):
        raise TypeError(f"register_model: {cls!r} is not a CTRModel subclass")
    name = getattr(cls, "name", "")
    if not name or name == CTRModel.name:
        raise ValueError(f"register_model: {cls.__qualname__} must set a class attribute `name`")
    other = MODELS.get(name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"register_model: name '{name}' is taken by {other.__module__}.{other.__qualname__}")
    MODELS[name] = cls
    return cls


def discover_models() -> dict[str, type[CTRModel]]:
    """Import every model module of this package once, so each registers itself."""
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in _NOT_MODELS and not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True
    return MODELS


def known_models() -> list[str]:
    return sorted(discover_models())


def constructor_parameters(cls: type[CTRModel]) -> list[str]:
    """The named constructor arguments a model class takes.

    A model whose `__init__` ends in `**common` hands those to its family base (e.g. `MultiScenarioModel` takes
    the arguments every multi-scenario backbone shares), so the bases' named arguments count too, up to
    `CTRModel`, whose `**params` only records them.
    """
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is CTRModel or not issubclass(klass, CTRModel):
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names += [p.name for p in params if p.kind in named and p.name not in ("self", "encoder", *names)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return names


def build_model(name: str, encoder: FeatureEncoder, params: Mapping[str, object] | None = None) -> CTRModel:
    """A model by registry name, built from the fitted encoder and its hyper-parameters (TypeError naming any
    parameter the model does not take)."""
    if name not in MODELS:
        discover_models()
    if name not in MODELS:
        raise KeyError(f"unknown model '{name}': known models are {known_models()}")
    cls = MODELS[name]
    params = dict(params or {})
    accepted = constructor_parameters(cls)
    unknown = sorted(k for k in params if k not in accepted)
    if unknown:
        raise TypeError(f"model '{name}': unknown parameters {unknown} (it takes {sorted(accepted)})")
    return cls(encoder, **params)


from ctrflow.models import dcnv2 as _dcnv2  # noqa: E402,F401  (the default model is always registered)

__all__ = ["MODELS", "CTRModel", "build_model", "discover_models", "known_models", "register_model", "to_tensors"]
