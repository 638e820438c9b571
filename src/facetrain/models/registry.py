"""Backbone registry (timm style): ``@register_backbone`` over a plain dict, one factory, one kwargs contract.

Every backbone takes ``(B, 3, 112, 112)`` float RGB normalized as ``(x / 255 - 0.5) / 0.5`` and returns a
``(B, D)`` unnormalized embedding, has ``forward_features`` and ``set_grad_checkpointing``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from facetrain.errors import ModelError, closest

if TYPE_CHECKING:
    from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}
_VARIANTS: dict[str, tuple[str, dict]] = {}


def register_backbone(
    fn: Callable[..., nn.Module] | None = None, *, name: str | None = None, aliases: tuple[str, ...] = ()
):
    """Register a backbone factory ``fn(embedding_size=512, **kw) -> nn.Module`` under its name (and aliases).

    Usable bare (``@register_backbone``) or with arguments (``@register_backbone(aliases=("r50",))``).
    """

    def _add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _BACKBONES or key in _ALIASES:
            raise ValueError(f"backbone {key!r} is registered twice")
        _BACKBONES[key] = factory
        for alias in aliases:
            if alias in _BACKBONES or alias in _ALIASES:
                raise ValueError(f"backbone alias {alias!r} is registered twice")
            _ALIASES[alias] = key
        return factory

    return _add(fn) if fn is not None else _add


def register_variant(variant: str, name: str, **defaults) -> None:
    """Register ``variant`` as ``name`` built with other default kwargs (e.g. arcface_torch's ``vit_t_dp005_mask0``).

    Variants share the architecture (and so the state-dict layout) of ``name``; they are not listed by
    ``list_backbones()`` unless ``include_aliases=True``.
    """
    if variant in _BACKBONES or variant in _ALIASES or variant in _VARIANTS:
        raise ValueError(f"backbone variant {variant!r} is registered twice")
    _VARIANTS[variant] = (name, dict(defaults))


def _ensure_registered() -> None:
    # Importing the model families fills the registry (they decorate their factories at import).
    from facetrain.models import democnn, iresnet, mobilefacenet, vit  # noqa: F401


def list_backbones(*, include_aliases: bool = False) -> list[str]:
    """Sorted names of the registered backbones (``timm:<name>`` backbones are built on demand and not listed)."""
    _ensure_registered()
    names = set(_BACKBONES)
    if include_aliases:
        names |= set(_ALIASES) | set(_VARIANTS)
    return sorted(names)


def canonical_name(name: str) -> str:
    """The registered name behind ``name`` (an alias such as ``r50`` gives ``iresnet50``); ModelError if unknown.

    Variants and ``timm:<name>`` are returned unchanged.
    """
    _ensure_registered()
    if name in _BACKBONES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    if name.startswith("timm:") or name in _VARIANTS:
        return name
    known = sorted(set(_BACKBONES) | set(_ALIASES) | set(_VARIANTS))
    hint = closest(name, known)
    did_you_mean = f" Did you mean {hint!r}?" if hint else ""
    raise ModelError(
        f"unknown backbone {name!r}.{did_you_mean} Known backbones: {', '.join(known)} (or timm:<name> with the "
        "timm extra)"
    )


def backbone_factory(name: str) -> Callable[..., nn.Module]:
    """The factory function registered under ``name`` (or the name an alias points to)."""
    key = canonical_name(name)
    if key in _VARIANTS:
        key = _VARIANTS[key][0]
    if key not in _BACKBONES:
        raise ModelError(f"{name!r} is not a registered factory (timm:<name> backbones are built on demand)")
    return _BACKBONES[key]


def build_backbone(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Build a backbone by name.

    Args:
        name: a registered name or alias (``list_backbones(include_aliases=True)``), or ``timm:<timm model name>``.
        embedding_size: D, the size of the output embedding.
        **kwargs: family-specific keyword arguments (``dropout``, ``blocks``, ``scale``, ``head``,
            ``gradient_checkpointing``, ...).

    Returns:
        A module mapping ``(B, 3, 112, 112)`` normalized RGB to a ``(B, D)`` embedding.
    """
    key = canonical_name(name)
    if key.startswith("timm:"):
        from facetrain.models.timm_backbone import build_timm_backbone

        return build_timm_backbone(key[len("timm:") :], embedding_size=embedding_size, **kwargs)
    if key in _VARIANTS:
        key, defaults = _VARIANTS[key]
        kwargs = {**defaults, **kwargs}
    try:
        return _BACKBONES[key](embedding_size=embedding_size, **kwargs)
    except TypeError as exc:
        if "keyword argument" not in str(exc):
            raise
        raise ModelError(f"backbone {name!r}: bad keyword arguments {sorted(kwargs)}: {exc}") from exc
