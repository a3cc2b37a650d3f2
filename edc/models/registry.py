"""The registry behind :func:`edc.models.create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from edc.errors import EdcError

if TYPE_CHECKING:  # annotations only: models and data are peers
    from edc.data.prepared import DatasetFacts

# A builder takes (in_channels, num_classes, image_size, **arch_kwargs) and returns an nn.Module.
Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
_COMMON = ("in_channels", "num_classes", "image_size")


def register_model(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        params = inspect.signature(fn).parameters
        missing = [p for p in _COMMON if p not in params]
        if missing:
            raise TypeError(f"builder for {name!r} must accept {missing}")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_kwargs(arch: str) -> dict[str, object]:
    """The architecture-specific keyword arguments of ``arch`` and their defaults."""
    if arch not in _REGISTRY:
        raise KeyError(f"unknown architecture {arch!r} (known: {', '.join(list_models())})")
    params = inspect.signature(_REGISTRY[arch]).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def create_model(arch: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    allowed = model_kwargs(arch)  # raises KeyError for an unknown arch
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{arch}: unknown argument(s) {unknown} (accepts: {sorted(allowed)})")
    return _REGISTRY[arch](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)


def build(arch: str, kwargs: dict[str, Any], facts: DatasetFacts) -> nn.Module:
    """``arch`` with ``kwargs`` for the images and classes of the dataset ``facts`` describes."""
    try:
        return create_model(arch, in_channels=facts.channels, num_classes=facts.num_classes,
                            image_size=facts.image_size, **kwargs)
    except ValueError as exc:  # a shape the architecture cannot take (e.g. a ViT patch that does not tile)
        raise EdcError(f"{arch} {kwargs or ''} on {facts.name} ({facts.image_size}px): {exc}") from None
