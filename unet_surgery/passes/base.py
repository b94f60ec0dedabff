"""The pass registry: every pass type is one config dataclass and one handler object.

In the manner of torchao's ``quantize_`` (one handler per config type), a handler owns all
there is to know about its pass: planning (which layers, with which per-layer entry), the
layer rewrite its layers get, the setting it contributes on each UNet call, what blocks
freezing it for export, the tensors it adds to an adapter, and why it could have no effect.
:class:`~unet_surgery.patching.patch.Patch`, the export formats and the recipe parser only go
through :func:`handler_for` and :func:`pass_types`; adding a pass is one file that defines a
config (a :class:`~unet_surgery.recipes.schema.PassConfig`) and a handler decorated with
:func:`register_pass` (see ``docs/architecture.md``).

Several passes may shape one layer (re-dilation, dispersion and noise-damped guidance all act
on the same conv): the layer is rewritten once, by its :class:`LayerRewrite`, and its setting
on a call is a fold over the handlers that planned it, in handler ``order``, starting from the
rewrite's ``off`` setting.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from unet_surgery.errors import SelectionError
from unet_surgery.graph.records import AttentionRecord, ConvRecord, UNetMap
from unet_surgery.ops.schedules import FactorSchedule
from unet_surgery.recipes.schema import PassConfig, Recipe, ScheduleSpec
from unet_surgery.recipes.selectors import Selection, closest_paths, select
from unet_surgery.runtime import UNetCall

if TYPE_CHECKING:
    from unet_surgery.patching.patch import Patch

AUTO = "auto"
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


# ----------------------------------------------------------------------------- schedules


def describe_schedule(s: ScheduleSpec) -> str:
    return "every step" if s.tau is None else f"steps < {s.tau:g} of {s.steps}"


@dataclass(frozen=True)
class FactorPlan:
    """A conv's factor over the trajectory. ``factor == "auto"`` is resolved per call."""

    factor: float | str
    schedule: ScheduleSpec

    def schedule_for(self, factor: float) -> FactorSchedule:
        # Read on every conv of every UNet call: built once per (spec, factor).
        return _factor_schedule(self.schedule, factor)

    def describe(self) -> str:
        text = self.factor if isinstance(self.factor, str) else f"{self.factor:g}"
        return f"{text}" + (", progressive" if self.schedule.progressive else "") + f", {describe_schedule(self.schedule)}"


@functools.lru_cache(maxsize=256)
def _factor_schedule(spec: ScheduleSpec, factor: float) -> FactorSchedule:
    return FactorSchedule(factor=factor, tau=spec.tau, steps=spec.steps, progressive=spec.progressive)


def auto_factor(latent_hw: tuple[int, int], base_latent_hw: tuple[int, int]) -> float:
    """FreeScale's restrained dilation: current size over base size, floored, at least 1."""
    import math

    ratio = max(latent_hw[0] / base_latent_hw[0], latent_hw[1] / base_latent_hw[1])
    return float(max(1, math.floor(ratio + 1e-9)))


def factor_now(patch: Patch, fp: FactorPlan | None, call: UNetCall | None) -> float:
    """The factor ``fp`` gives for ``call`` (1 when off), with ``patch``'s step bookkeeping."""
    if fp is None:
        return 1.0
    factor = fp.factor
    if factor == AUTO:
        if call is None or not call.latent_hw[0]:
            return 1.0
        factor = auto_factor(call.latent_hw, patch.base_latent_hw)
    schedule = fp.schedule_for(float(factor))
    if call is None or call.timestep is None:
        return float(schedule.factor) if schedule.tau is None else 1.0
    tracker = patch.tracker
    if tracker.timesteps and call.step is not None:
        return schedule.factor_at_step(call.step, len(tracker.timesteps))
    return schedule.factor_at_timestep(call.timestep, None, tracker.num_train_timesteps)


def active_now(patch: Patch, schedule: ScheduleSpec, call: UNetCall | None) -> bool:
    """Whether ``schedule``'s window is open on ``call``."""
    return factor_now(patch, FactorPlan(2.0, schedule), call) != 1.0


def window_is_empty(schedule: ScheduleSpec) -> bool:
    """True when no step can fall inside the window (``tau`` of 0)."""
    return schedule.tau is not None and schedule.tau <= 0


# ----------------------------------------------------------------------------- handlers


class PassHandler(Generic[C]):
    """Everything one pass type does. Subclass, set the class attributes, register.

    ``type`` is the recipe's ``type:`` string, ``config`` the dataclass, ``rewrite`` the
    :class:`LayerRewrite` its layers get and ``order`` its position when several passes shape
    one layer's setting (lower first).
    """

    type: ClassVar[str]
    config: ClassVar[builtins.type[PassConfig]]
    rewrite: ClassVar[LayerRewrite]
    order: ClassVar[int] = 0

    # --- planning (pure) -------------------------------------------------------------------
    def plan(self, config: C, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> None:
        """Add this pass's layers to ``plan`` (``plan.add``); raise SelectionError on misuse."""
        raise NotImplementedError

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


def _load_builtin() -> None:
    import unet_surgery.passes  # noqa: F401  (registers the built-in passes)


def pass_types() -> dict[str, type[PassConfig]]:
    """``type`` string -> config dataclass of every registered pass."""
    _load_builtin()
    return {name: h.config for name, h in _HANDLERS.items()}


def handler_for(config: PassConfig | str) -> PassHandler[Any]:
    """The handler of a config (or of a ``type`` string)."""
    _load_builtin()
    name = config if isinstance(config, str) else type(config).type
    try:
        return _HANDLERS[name]
    except KeyError:
        raise SelectionError(f"no handler is registered for pass type {name!r}") from None


# ----------------------------------------------------------------------------- planning helpers


def selection(config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> Selection:
    """Resolve a pass's selector (and its ``factors`` table), honouring ``on_missing``."""
    where = f"passes[{index}] ({type(config).type})"
    sel = config.select
    table = getattr(config, "factors", None) or {}
    if table and sel.paths is None:
        # A table without explicit paths selects exactly its layers (within the criteria).
        sel = replace(sel, paths=tuple(table))
    found = select(unet_map, sel, where=where)
    if filter_fn is not None:
        found.records = [r for r in found.records if filter_fn(r.path, r.op)]
        if not found.records:
            raise SelectionError(f"{where}: filter_fn rejected every selected layer")
    extra = [p for p in table if p not in {r.path for r in found.records} and p not in found.missing]
    absent = [*found.missing, *(p for p in extra if p not in unet_map.paths())]
    if absent:
        if getattr(config, "on_missing", "error") == "error":
            first = absent[0]
            close = found.suggestions.get(first) or []
            raise SelectionError(
                f"{where}: {len(absent)} listed layer(s) do not exist in {unet_map.model_class}, e.g. {first!r}"
                + (f" (closest: {', '.join(close)})" if close else "")
                + "; set on_missing: warn to skip them"
            )
        for path in absent:
            plan.missing.append(MissingPath(index, path, found.suggestions.get(path) or closest_paths(path, unet_map.paths())))
    return found


def spatial_convs(config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None) -> list[ConvRecord]:
    """The selected layers, which must all be spatial convolutions."""
    out = []
    for rec in selection(config, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, ConvRecord) or rec.axis == "temporal":
            raise SelectionError(f"passes[{index}] ({type(config).type}): {rec.path} is not a spatial convolution")
        out.append(rec)
    return out


def spatial_self_attentions(
    config: Any, index: int, unet_map: UNetMap, plan: Plan, filter_fn: FilterFn | None
) -> list[AttentionRecord]:
    """The selected layers, which must all be spatial self-attention."""
    out = []
    for rec in selection(config, index, unet_map, plan, filter_fn).records:
        if not isinstance(rec, AttentionRecord) or rec.kind != "self" or rec.axis != "spatial":
            raise SelectionError(f"passes[{index}] ({type(config).type}): {rec.path} is not a spatial self-attention")
        out.append(rec)
    return out


def factor_for(config: Any, path: str, where: str) -> float | str:
    """A layer's factor: its ``factors`` entry, else the pass's ``factor``."""
    if path in config.factors:
        return config.factors[path]
    if config.factor is None:
        raise SelectionError(f"{where}: {path} has no entry in factors and the pass has no default factor")
    return config.factor


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
