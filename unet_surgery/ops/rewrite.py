"""One in-place layer rewrite: swap a module's class, read a setting per forward, restore.

Every rewrite of the library (re-dilated convs, scale-fusion attention, and any pass that wraps
a block) works the same way, in the manner of tomesd: the module's ``__class__`` is replaced by
a subclass whose ``forward`` reads a *setting source* on every call, so parameters, buffers,
``state_dict`` keys, hooks and ``.to()`` are untouched, and :func:`restore` puts the original
class back bit for bit. This module owns that mechanism once:

* :class:`Rewritten` -- the mixin every swapped-in class derives from; a subclass names the
  instance attributes and non-persistent buffers it adds, so :func:`restore` removes them;
* :func:`swapped_class` -- the swapped counterpart of a class, made once per (mixin, class);
* :func:`install` / :func:`restore` / :func:`is_rewritten` -- swap and unswap;
* :func:`source` / :func:`set_source` / :func:`read_setting` / :func:`frozen_source` -- the
  public way to read, replace or temporarily pin a rewritten module's setting (export uses it).

A module whose *instance* carries its own ``forward`` (monkey-patched by another tool, e.g.
accelerate's offload hooks) is refused: the instance attribute wins over any class, so a
class swap would silently do nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, ClassVar

from torch import nn

from unet_surgery.errors import TransformError

__all__ = [
    "Rewritten",
    "frozen_source",
    "install",
    "is_rewritten",
    "read_setting",
    "restore",
    "set_source",
    "source",
    "swapped_class",
]

SOURCE_ATTR = "_unet_surgery_source"


class Rewritten:
    """Mixin of every swapped-in class.

    ``_rewrite_base`` is the class to restore; ``_rewrite_attrs`` and ``_rewrite_buffers`` are
    the instance attributes and non-persistent buffers the rewrite adds (removed on restore).
    """

    _rewrite_base: ClassVar[type[nn.Module]]
    _rewrite_attrs: ClassVar[tuple[str, ...]] = ()
    _rewrite_buffers: ClassVar[tuple[str, ...]] = ()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused in one line: a swapped class is made at run time and reads a live setting
        source, so a pickle could not be loaded back into a working layer."""
        raise TransformError(
            f"cannot pickle a {type(self).__name__} rewritten by unet-surgery; remove the patch first "
            "(patch.remove()), or save it with save_patch() / export it (unet-surgery export)"
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """The ordinary deep copy (pickling is refused above, copying is not)."""
        import copy

        cls = type(self)
        copied = cls.__new__(cls)
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))  # type: ignore[attr-defined]
        return copied


_SWAPPED: dict[tuple[type, type], type[nn.Module]] = {}


def register_swapped(mixin: type[Rewritten], cls: type[nn.Module], swapped: type[nn.Module]) -> None:
    """Use the named class ``swapped`` for ``cls`` (so e.g. ``RedilatedConv2d`` is public)."""
    _SWAPPED[(mixin, cls)] = swapped


def swapped_class(mixin: type[Rewritten], cls: type[nn.Module], **attrs: Any) -> type[nn.Module]:
    """``cls`` with ``mixin``'s forward in front, created once per (mixin, class)."""
    key = (mixin, cls)
    if key not in _SWAPPED:
        name = f"{getattr(mixin, '_rewrite_prefix', 'Rewritten')}{cls.__name__}"
        _SWAPPED[key] = type(name, (mixin, cls), {"_rewrite_base": cls, **attrs})
    return _SWAPPED[key]


def is_rewritten(module: nn.Module, mixin: type[Rewritten] = Rewritten) -> bool:
    """Whether ``module`` is currently swapped (by ``mixin``'s rewrite, when given)."""
    return isinstance(module, mixin)


def check_swappable(module: nn.Module) -> None:
    """Refuse a module whose instance has its own ``forward``: a class swap would be bypassed."""
    if "forward" in module.__dict__:
        raise TransformError(
            f"this {type(module).__name__} has an instance-level forward (set by another tool, "
            "e.g. an offload or profiling hook); the instance attribute takes precedence over "
            "any class, so the rewrite would silently do nothing. Remove that wrapper "
            "(del module.forward) or apply unet-surgery before it"
        )


def install(
    module: nn.Module,
    swapped: type[nn.Module],
    setting_source: Any,
    *,
    replace: bool = False,
    attrs: dict[str, Any] | None = None,
    buffers: dict[str, Any] | None = None,
) -> nn.Module:
    """Swap ``module`` to ``swapped`` and attach its setting source, attributes and buffers.

    An already rewritten module raises :class:`TransformError` unless ``replace=True``, which
    drops what the previous install added and attaches the new source in place.
    """
    check_swappable(module)
    if is_rewritten(module):
        if not replace:
            raise TransformError(
                f"{type(module).__name__} is already rewritten; restore it first or pass replace=True"
            )
        if type(module) is not swapped:
            raise TransformError(f"{type(module).__name__} is rewritten by another kind of rewrite")
        _strip(module)
    else:
        module.__class__ = swapped
    module.__dict__[SOURCE_ATTR] = setting_source
    for name, value in (attrs or {}).items():
        module.__dict__[name] = value
    for name, tensor in (buffers or {}).items():
        module.register_buffer(name, tensor, persistent=False)
    return module


def _strip(module: nn.Module) -> None:
    cls: Any = type(module)
    for name in (SOURCE_ATTR, *cls._rewrite_attrs):
        module.__dict__.pop(name, None)
    for name in cls._rewrite_buffers:
        if name in module._buffers:
            delattr(module, name)


def restore(module: nn.Module) -> nn.Module:
    """Undo :func:`install`: the original class back, every added attribute gone."""
    if not is_rewritten(module):
        raise TransformError(f"{type(module).__name__} is not rewritten; nothing to restore")
    _strip(module)
    module.__class__ = type(module)._rewrite_base  # type: ignore[attr-defined]
    return module


def source(module: nn.Module) -> Any:
    """The setting source of a rewritten module (a constant or a zero-argument callable)."""
    if not is_rewritten(module):
        raise TransformError(f"{type(module).__name__} is not rewritten; it has no setting source")
    return module.__dict__[SOURCE_ATTR]


def set_source(module: nn.Module, setting_source: Any) -> Any:
    """Replace the setting source of a rewritten module; returns the previous one."""
    previous = source(module)
    module.__dict__[SOURCE_ATTR] = setting_source
    return previous


def read_setting(module: nn.Module) -> Any:
    """The raw value the source gives now (the callable is called)."""
    value = source(module)
    return value() if callable(value) else value


@contextlib.contextmanager
def frozen_source(module: nn.Module, setting: Any) -> Iterator[None]:
    """Pin ``module``'s setting to the constant ``setting`` inside the block (export phases)."""
    previous = set_source(module, setting)
    try:
        yield
    finally:
        module.__dict__[SOURCE_ATTR] = previous


def attention_arguments(cls: type[nn.Module]) -> tuple[str, str]:
    """Names of the context and mask arguments of an attention class's ``forward``.

    Attention rewrites pass self-attention calls on and leave cross-attention or masked calls
    alone, so they must know the convention: diffusers ``(hidden_states,
    encoder_hidden_states, attention_mask, **kw)`` or LDM ``(x, context, mask)``.
    """
    params = list(inspect.signature(cls.forward).parameters)[1:]
    if params[1:3] == ["encoder_hidden_states", "attention_mask"]:
        return "encoder_hidden_states", "attention_mask"
    if params[1:3] == ["context", "mask"]:
        return "context", "mask"
    raise TransformError(
        f"{cls.__name__}.forward{tuple(params)} is neither a diffusers Attention "
        "(hidden_states, encoder_hidden_states, attention_mask) nor an LDM attention "
        "(x, context, mask)"
    )
