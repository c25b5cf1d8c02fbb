"""Registry of training methods: ``kdcli list methods`` and ``method.name`` in recipes."""

from __future__ import annotations

import dataclasses
from typing import Any

from kdcli.errors import UserError
from kdcli.methods.base import (
    FEATURE_TERMS,
    Batch,
    Method,
    StepInfo,
    StepOutput,
    check_weights,
    params_table,
    parse_params,
    parse_term_params,
)
from kdcli.recipes import MethodConfig

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method name, sorted (the built-in ones are imported first)."""
    _load_builtin()
    return sorted(METHODS)


def get_method(name: str) -> type[Method]:
    if name not in method_names():
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(method_names())} "
                        "(see `kdcli list methods`)")
    return METHODS[name]


def validate_method_config(cfg: MethodConfig, source: str) -> None:
    try:
        cls = get_method(cfg.name)
    except UserError as err:
        raise UserError(f"recipe {source}: 'method.name': {err}") from None
    parse_params(cls, cfg.params, source)
    check_weights(cls, cfg.weights, source)
    for name in FEATURE_TERMS:
        if name in cfg.params:
            parse_term_params(name, cfg.params, source)


def resolved_method(section: dict[str, Any]) -> dict[str, Any]:
    """A ``method`` section with every weight and hyper-parameter the method uses spelled out: its default
    weights under the recipe's, and its typed params with their defaults (feature-term sections as given)."""
    cls = get_method(section["name"])
    params = section.get("params") or {}
    typed = dataclasses.asdict(parse_params(cls, params))
    return {**section, "weights": {**cls.default_weights, **(section.get("weights") or {})},
            "params": {**typed, **{key: value for key, value in params.items() if key not in typed}}}


def describe_methods() -> list[dict[str, str]]:
    _load_builtin()
    return [
        {"method": name, "summary": cls.summary, "loss terms (default weight)":
            ", ".join(f"{k}={v:g}" for k, v in cls.default_weights.items()),
         "optional terms": ", ".join([*cls.optional_terms, *(["any feature term"] if cls.teacher_taps else [])]),
         "params": params_table(cls)}
        for name, cls in sorted(METHODS.items())
    ]


def _load_builtin() -> None:
    """Import every module of this package once; each registers its methods with @register."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


__all__ = ["Batch", "Method", "StepInfo", "StepOutput", "METHODS", "register", "get_method", "method_names",
           "validate_method_config", "describe_methods"]
