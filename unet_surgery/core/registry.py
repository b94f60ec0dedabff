"""The pass registry: every pass type is one config dataclass and one handler object.

In the manner of torchao's ``quantize_`` (one handler per config type), a handler owns all
there is to know about its pass: planning (which layers, with which per-layer entry), the
layer rewrite its layers get, the setting it contributes on each UNet call, model-level hooks
and state (through the patch), what blocks freezing it for export, the tensors it adds to an
adapter, and why it could have no effect. :class:`~unet_surgery.patching.patch.Patch`, the
export formats and the recipe parser only go through :func:`handler_for` and
:func:`pass_types`.

Several passes may shape one layer (re-dilation, dispersion and noise-damped guidance all act
on the same conv): the layer is rewritten once, by its :class:`LayerRewrite`, and its setting
on a call is a fold over the handlers that planned it, in handler ``order``, starting from the
rewrite's ``off`` setting.

This module is below :mod:`unet_surgery.passes` and :mod:`unet_surgery.recipes`: it imports
neither. The built-in passes register themselves when :mod:`unet_surgery.passes` is imported
(importing ``unet_surgery`` does).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from unet_surgery.core.schema import PassConfig, Recipe
from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap
from unet_surgery.runtime import UNetCall

if TYPE_CHECKING:
    from unet_surgery.patching.patch import Patch

Record = ConvRecord | AttentionRecord
FilterFn = Callable[[str, str], bool]
C = TypeVar("C", bound=PassConfig)


# ----------------------------------------------------------------------------- layer rewrites


@dataclass(frozen=True)
class LayerRewrite:
    """How one kind of layer is rewritten in place (a class swap from ``unet_surgery.ops``).

    ``install(module, source, extras)`` swaps the module so it reads ``source()`` on every
    forward (``extras`` are what the handlers' :meth:`PassHandler.prepare` returned);
    ``restore`` undoes it. ``off`` is the setting that means "the plain layer", ``group`` the
    key its paths are listed under in adapter metadata, ``split_batches`` whether a setting
    may differ per slice of the batch (noise-damped guidance), and ``summary`` turns a
    setting into a manifest row (None when the setting is plain).
    """

    name: str
    group: str
    off: Any
    install: Callable[[nn.Module, Callable[[], Any], dict[str, Any]], Any]
    restore: Callable[[nn.Module], Any]
    summary: Callable[[Any], dict[str, Any] | None]
    split_batches: bool = False


# ----------------------------------------------------------------------------- plans


@dataclass
class LayerPart:
    """One pass's contribution to one layer."""

    handler: PassHandler[Any]
    entry: Any
    pass_index: int


@dataclass
class LayerPlan:
    """A layer that is rewritten, and every pass that shapes its setting (in handler order)."""

    path: str
    record: Record | None
    rewrite: LayerRewrite
    parts: list[LayerPart] = field(default_factory=list)

    def entry(self, pass_type: str) -> Any | None:
        """The entry of pass type ``pass_type`` on this layer, if it has one."""
        return next((p.entry for p in self.parts if p.handler.type == pass_type), None)


@dataclass
class MissingPath:
    pass_index: int
    path: str
    suggestions: list[str]


@dataclass
class Plan:
    """Per-layer plan of a recipe on one model: pure data, nothing is touched."""

    recipe: Recipe
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    missing: list[MissingPath] = field(default_factory=list)

    def add(self, path: str, record: Record | None, handler: PassHandler[Any], entry: Any, index: int) -> None:
        """Record that pass ``index`` (handled by ``handler``) acts on ``path`` with ``entry``."""
        layer = self.layers.get(path)
        if layer is None:
            layer = self.layers[path] = LayerPlan(path, record, handler.rewrite)
        elif layer.rewrite is not handler.rewrite:
            raise SelectionError(
                f"passes[{index}] ({handler.type}): {path} is already rewritten as "
                f"{layer.rewrite.name} by another pass"
            )
        existing = next((p for p in layer.parts if p.handler is handler), None)
        if existing is not None:  # a later pass of the same type overrides, as before
            existing.entry, existing.pass_index = entry, index
        else:
            layer.parts.append(LayerPart(handler, entry, index))
            layer.parts.sort(key=lambda p: p.handler.order)

    def entries(self, pass_type: str) -> dict[str, Any]:
        """``path -> entry`` of every layer pass type ``pass_type`` acts on."""
        out = {}
        for path, layer in self.layers.items():
            entry = layer.entry(pass_type)
            if entry is not None:
                out[path] = entry
        return out

    def planned_by(self, index: int) -> list[str]:
        """Paths of the layers pass ``index`` of the recipe acts on."""
        return [p for p, layer in self.layers.items() if any(x.pass_index == index for x in layer.parts)]

    def paths(self, group: str) -> list[str]:
        """Sorted paths of the layers whose rewrite lists them under ``group``."""
        return sorted(p for p, layer in self.layers.items() if layer.rewrite.group == group)

    def groups(self) -> dict[str, list[str]]:
        """Sorted paths per rewrite group, every registered group present (adapter metadata)."""
        names = sorted({h.rewrite.group for h in _HANDLERS.values()} | {lp.rewrite.group for lp in self.layers.values()})
        return {g: self.paths(g) for g in names}

    def rows(self) -> list[dict[str, Any]]:
        """One row per (layer, pass): path, op, what changes and when (for reports)."""
        rows = []
        for layer in self.layers.values():
            op = layer.record.op if layer.record is not None else layer.rewrite.name
            for part in layer.parts:
                rows.append({"path": layer.path, "op": op, "change": part.handler.type,
                             "setting": part.handler.describe(part.entry)})
        return rows


# ----------------------------------------------------------------------------- handlers


class PassHandler(Generic[C]):
    """Everything one pass type does. Subclass, set the class attributes, register.

    ``type`` is the recipe's ``type:`` string, ``config`` the dataclass, ``rewrite`` the
    :class:`LayerRewrite` its layers get and ``order`` its position when several passes shape
    one layer's setting (lower first). ``cfg_batches`` says the pass acts on ``[uncond, cond]``
    batches (a guidance pass): a pipeline integration then declares them (``set_cfg_batches``).
    """

    type: ClassVar[str]
    config: ClassVar[builtins.type[PassConfig]]
    rewrite: ClassVar[LayerRewrite]
    order: ClassVar[int] = 0
    cfg_batches: ClassVar[bool] = False

    # --- planning (pure) -------------------------------------------------------------------
    def plan(self, config: C, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> None:
        """Add this pass's layers to ``plan``: every layer :meth:`layers` selects, with the
        entry :meth:`entry` makes for it (None skips the layer). Raise SelectionError on misuse.
        Override only when a pass plans other modules than it selects (RAU-Net's partners)."""
        for rec in self.layers(config, index, unet_map, plan, filter_fn):
            entry = self.entry(config, index, rec)
            if entry is not None:
                plan.add(rec.path, rec, self, entry, index)

    def layers(self, config: C, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[Any]:
        """The layers the pass selects (a selection helper of :mod:`unet_surgery.passes.base`)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither layers() nor plan()")

    def entry(self, config: C, index: int, rec: Any) -> Any:
        """What the pass keeps for one selected layer (default: the config itself)."""
        return config

    def check_plan(self, plan: Plan) -> None:
        """Cross-pass checks once every pass is planned (e.g. dispersion needs re-dilation)."""

    def describe(self, entry: Any) -> str:
        """One line saying what the pass does to a layer, for reports."""
        return ""

    def no_effect_reasons(self, config: C, index: int, recipe: Recipe, plan: Plan | None) -> list[str]:
        """Why this pass can change nothing (empty when it can act).

        ``plan`` is None when no model is at hand (``recipes validate``): then only what the
        recipe alone shows is reported; with a plan, what the selected layers show as well.
        """
        return []

    # --- installing ------------------------------------------------------------------------
    def prepare(self, module: nn.Module, entry: Any) -> dict[str, Any]:
        """Extra install arguments for the layer rewrite (e.g. a dispersed kernel)."""
        return {}

    def attach(self, patch: Patch) -> None:
        """Model-level set-up, once per patch that plans this pass: named hooks
        (``patch.hooks.add``); ``patch.remove()`` removes them. State a pass keeps between
        calls lives in ``patch.state.slot(pass_index, branch)``, never in the module."""

    def setting(self, patch: Patch, entry: Any, branch: str, call: UNetCall | None, current: Any) -> Any:
        """The layer's setting on ``call`` after this pass, given the setting before it."""
        return current

    # --- export ----------------------------------------------------------------------------
    def freeze_error(self, path: str, setting: Any) -> str | None:
        """Why ``setting`` cannot be frozen into a static program (None: it can)."""
        return None

    def adapter_tensors(self, path: str, module: nn.Module, entry: Any) -> dict[str, torch.Tensor]:
        """Tensors this pass adds to ``module`` that an adapter stores (keyed by full name)."""
        return {}


_HANDLERS: dict[str, PassHandler[Any]] = {}


def register_pass(handler_cls: type[PassHandler[Any]]) -> type[PassHandler[Any]]:
    """Class decorator: make ``handler_cls`` the handler of its config's ``type``.

    Args:
        handler_cls: a :class:`PassHandler` subclass whose ``config`` names the pass ``type``.
    """
    name = handler_cls.config.type
    if handler_cls.type != name:
        raise TypeError(f"{handler_cls.__name__}.type {handler_cls.type!r} != its config's type {name!r}")
    _HANDLERS[name] = handler_cls()
    return handler_cls


def unregister_pass(name: str) -> None:
    """Forget the handler of pass type ``name`` (plugins and tests that register their own)."""
    _HANDLERS.pop(name, None)


def pass_types() -> dict[str, type[PassConfig]]:
    """``type`` string -> config dataclass of every registered pass (the built-in ones are
    registered by importing :mod:`unet_surgery.passes`, which importing the package does)."""
    return {name: h.config for name, h in _HANDLERS.items()}


def handler_for(config: PassConfig | str) -> PassHandler[Any]:
    """The handler of a config (or of a ``type`` string)."""
    name = config if isinstance(config, str) else type(config).type
    try:
        return _HANDLERS[name]
    except KeyError:
        raise SelectionError(f"no handler is registered for pass type {name!r}") from None


def make_plan(recipe: Recipe, unet_map: UNetMap, filter_fn: FilterFn | None = None) -> Plan:
    """Resolve every pass of ``recipe`` against ``unet_map`` through its handler.

    Args:
        recipe: the recipe whose passes to resolve.
        unet_map: the map of the model the recipe is planned on.
        filter_fn: ``filter_fn(path, op)``: keep only the layers it returns True for.
    """
    plan = Plan(recipe)
    handlers = []
    for index, config in enumerate(recipe.passes):
        handler = handler_for(config)
        handler.plan(config, index, unet_map, plan, filter_fn)
        handlers.append(handler)
    for handler in dict.fromkeys(handlers):
        handler.check_plan(plan)
    return plan


def no_effect_reasons(recipe: Recipe, plan: Plan | None = None) -> list[str]:
    """Every reason a pass of ``recipe`` can have no effect (on ``plan``'s layers, if given).

    Args:
        recipe: the recipe to check.
        plan: its plan on a model, for the per-layer reasons (None: the recipe alone).
    """
    out = []
    for index, config in enumerate(recipe.passes):
        for reason in handler_for(config).no_effect_reasons(config, index, recipe, plan):
            out.append(f"passes[{index}] ({type(config).type}): {reason}")
    return out
