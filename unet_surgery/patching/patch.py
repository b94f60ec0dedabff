"""``apply(model, recipe) -> Patch`` and ``Patch.remove()``: in-place, weight-sharing rewrites.

Every layer a recipe selects is planned by its passes' handlers (:mod:`unet_surgery.passes`)
and class-swapped once by its layer rewrite (:mod:`unet_surgery.ops.rewrite`), so parameters,
``state_dict`` keys and LoRA loading are untouched, and no tensor is added (dispersed kernels
are computed from the live weights while used). A forward pre-hook records each UNet call's
timestep and size and resolves every layer's setting (the handlers' contributions folded in
order) before the forward: schedules work inside any unmodified sampling loop and under
``torch.compile``. ``remove()`` restores the model bit for bit.

What passes keep between calls (a RAU-Net pair's recorded size, a seeded generator) lives in
the patch's :class:`~unet_surgery.patching.state.PatchState`, and model-level hooks (noise-damped
guidance's batch split) in its :class:`~unet_surgery.patching.state.ModelHooks`: both are
created here and cleared by ``remove()``. A ControlNet's residuals go through the patch too
(:mod:`unet_surgery.patching.controlnet`), resized to the features they meet where a pass
changes a feature size.

Threads: a forward sees the whole patch or none of it. ``remove()`` waits for the forwards in
flight, and a forward that starts while the patch is being removed (or before it is fully
installed) runs every layer plain. Removing from two threads at once removes once.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from unet_surgery.errors import SurgeryError
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.ops.redilate import BatchSplit
from unet_surgery.passes.base import LayerPlan, Plan, make_plan, no_effect_reasons
from unet_surgery.patching.controlnet import ControlNetResiduals
from unet_surgery.patching.state import ModelHooks, PatchState
from unet_surgery.recipes.schema import Recipe
from unet_surgery.runtime import MAIN, UNetCall, UNetCallTracker

PATCH_ATTR = "_unet_surgery_patch"
PICKLE_REFUSAL = (
    "cannot pickle a model patched by unet-surgery; call patch.remove() first, or save the patch "
    "with save_patch() / export it (unet-surgery export)"
)


class NoEffectWarning(UserWarning):
    """A pass of the applied recipe cannot change anything (see ``no_effect_reasons``)."""


class Patch:
    """A recipe applied to a model. Use :meth:`remove` or ``with apply(...):``."""

    def __init__(self, model: nn.Module, recipe: Recipe, unet_map: UNetMap, plan: Plan, tracker: UNetCallTracker):
        self.model = model
        self.recipe = recipe
        self.unet_map = unet_map
        self.plan = plan
        self.tracker = tracker
        self._modules: list[tuple[nn.Module, LayerPlan]] = []
        self.state = PatchState()
        self.hooks = ModelHooks(model)
        self.cfg_batches = False  # the caller's batches are [uncond, cond] halves (set_cfg_batches)
        self.active = False
        self._interned: dict[Any, Any] = {}
        self._init_concurrency()

    def _init_concurrency(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._closing = False
        self._depth = threading.local()  # this thread's forwards of the model in flight

    # --- schedule -----------------------------------------------------------------------
    def set_timesteps(self, timesteps: Any) -> None:
        """Give the sampler's timestep list so steps are exact (else inferred from t / T)."""
        self.tracker.set_timesteps(timesteps)

    @property
    def base_latent_hw(self) -> tuple[int, int]:
        h, w = self.recipe.base_resolution
        s = self.recipe.vae_scale_factor
        return (max(1, h // s), max(1, w // s))

    def layer_setting(self, layer: LayerPlan, branch: str, call: UNetCall | None) -> Any:
        """A layer's setting on ``call`` in ``branch``: its passes folded in handler order."""
        setting = layer.rewrite.off
        for part in layer.parts:
            setting = part.handler.setting(self, part.entry, branch, call, setting)
        return setting

    def current_setting(self, layer: LayerPlan) -> Any:
        """What ``layer`` runs with on the current UNet call (a BatchSplit while guidance splits).

        Plain (the rewrite's ``off``) outside a UNet call this patch's pre-hook recorded on
        this thread: a forward that started before the patch was complete, or while it is
        being removed, sees no patch; one recorded before removal began keeps all of it.
        """
        call = self.tracker.current
        if call is None:
            return layer.rewrite.off
        if call.settings is not None:
            return call.settings[layer.path]
        return self._resolve(layer, call)

    def _resolve(self, layer: LayerPlan, call: UNetCall | None) -> Any:
        if call is not None and call.groups and layer.rewrite.split_batches:
            return BatchSplit(tuple((rows, self.layer_setting(layer, branch, call)) for rows, branch in call.groups))
        return self.layer_setting(layer, MAIN, call)

    def resolve_settings(self) -> None:
        """Fix every layer's setting for the call in flight, before the forward runs.

        Called by the pre-hook (and again by noise-damped guidance once it has split the
        batch). Layers then read a constant per call: a compiled forward sees only the
        settings, never the step, so it compiles once per distinct phase of the schedule.
        Equal settings are shared objects, so consecutive calls in one phase look the same.
        """
        call = self.tracker.current
        if call is None:
            return
        call.settings = None
        settings: dict[str, Any] = {}
        for path, layer in self.plan.layers.items():
            value = self._resolve(layer, call)
            with contextlib.suppress(TypeError):  # an unhashable setting is kept as it is
                value = self._interned.setdefault(value, value)
            settings[path] = value
        call.settings = settings

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._cond:
            if not self.active or self._closing:  # not (or no longer) installed: run plain
                self.tracker.current = None
                return
            self._in_flight += 1
            self._depth.n = getattr(self._depth, "n", 0) + 1
        self.tracker.record(module, args, kwargs)
        self.resolve_settings()

    def _post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Last hook of every forward (also when it raised): the call is over."""
        self.tracker.current = None
        if getattr(self._depth, "n", 0) > 0:
            with self._cond:
                self._depth.n -= 1
                self._in_flight -= 1
                self._cond.notify_all()

    @property
    def wants_cfg_batches(self) -> bool:
        """Whether a pass of the recipe acts on ``[uncond, cond]`` halves (noise-damped
        guidance, FouriScale's guidance): samplers that batch so call :meth:`set_cfg_batches`."""
        return any(part.handler.cfg_batches for layer in self.plan.layers.values() for part in layer.parts)

    def set_cfg_batches(self, on: bool) -> None:
        """Declare that the model's batches are ``[uncond, cond]`` halves (classifier-free
        guidance), which passes acting on the batch (noise-damped guidance) need;
        :func:`apply_to_pipeline` does it for you."""
        self.cfg_batches = bool(on)

    def enable_noise_damped_cfg(self) -> None:
        """``set_cfg_batches(True)`` for a recipe with a ``noise_damped_cfg`` pass (kept for callers)."""
        if not self.plan.entries("noise_damped_cfg"):
            raise SurgeryError(f"recipe {self.recipe.name!r} has no noise_damped_cfg pass")
        self.set_cfg_batches(True)

    def disable_noise_damped_cfg(self) -> None:
        self.set_cfg_batches(False)

    # --- install / remove ---------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        try:
            for path, layer in self.plan.layers.items():
                module = model.get_submodule(path)
                extras: dict[str, Any] = {}
                for part in layer.parts:
                    extras.update(part.handler.prepare(module, part.entry))
                layer.rewrite.install(module, _setting_source(self, layer), extras)
                self._modules.append((module, layer))
            self.hooks.add("patch", pre=self._pre_forward)
            for handler in dict.fromkeys(part.handler for layer in self.plan.layers.values() for part in layer.parts):
                handler.attach(self)
            ControlNetResiduals(self).attach()  # after the passes' hooks: residuals as they left them
            self.hooks.add("patch.end", post=self._post_forward)  # added last: runs after every other post hook
            object.__setattr__(model, PATCH_ATTR, self)
            with self._cond:
                self.active = True
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        self.hooks.clear()
        for module, layer in reversed(self._modules):
            layer.rewrite.restore(module)
        self._modules.clear()
        if getattr(self.model, PATCH_ATTR, None) is self:
            object.__delattr__(self.model, PATCH_ATTR)
        self._interned.clear()
        self.state.clear()
        self.tracker.reset()
        self.cfg_batches = False
        self.active = False

    def remove(self) -> None:
        """Undo the patch. Removing twice, or from two threads at once, removes once.

        Waits for the forwards in flight on other threads; forwards that start meanwhile run
        plain. Refused from inside a forward of the patched model (it would wait for itself).
        """
        with self._cond:
            if not self.active or self._closing:
                while self.active:  # another thread is removing: return once it is done
                    self._cond.wait()
                return
            if getattr(self._depth, "n", 0):
                raise SurgeryError("cannot remove a patch from inside a forward of the patched model")
            self._closing = True
            while self._in_flight:
                self._cond.wait()
        try:
            self._uninstall()
        finally:
            with self._cond:
                self.active = False
                self._closing = False
                self._cond.notify_all()

    def __deepcopy__(self, memo: dict[int, Any]) -> Patch:
        """Reached through ``copy.deepcopy(model)``: the copy carries its own working patch
        (its own hooks, empty state slots, no call in flight)."""
        import copy

        copied = Patch.__new__(Patch)
        memo[id(self)] = copied
        skip = {"_cond", "_in_flight", "_closing", "_depth"}
        for key, value in self.__dict__.items():
            if key not in skip:
                setattr(copied, key, copy.deepcopy(value, memo))
        copied._init_concurrency()
        return copied

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise SurgeryError(PICKLE_REFUSAL)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- reporting ----------------------------------------------------------------------
    def report(self) -> str:
        rows = self.plan.rows()
        lines = [f"recipe {self.recipe.name}: {len(rows)} change(s) on {self.unet_map.model_class}"]
        if rows:
            width = max(len(r["path"]) for r in rows)
            lines.extend(f"  {r['path']:<{width}}  {r['op']:<9}  {r['change']:<16}  {r['setting']}" for r in rows)
        for m in self.plan.missing:
            close = f" (closest: {', '.join(m.suggestions)})" if m.suggestions else ""
            lines.append(f"  missing in model, skipped: passes[{m.pass_index}] {m.path}{close}")
        return "\n".join(lines)


class _SettingSource:
    """A layer's setting source: an object, not a closure, so ``copy.deepcopy`` of a patched
    model gives layers that read the *copy's* patch (a closure would keep the original's)."""

    __slots__ = ("layer", "patch")

    def __init__(self, patch: Patch, layer: LayerPlan) -> None:
        self.patch, self.layer = patch, layer

    def __call__(self) -> Any:
        return self.patch.current_setting(self.layer)


def _setting_source(patch: Patch, layer: LayerPlan) -> Callable[[], Any]:
    return _SettingSource(patch, layer)


def current_patch(model: nn.Module) -> Patch | None:
    """The patch applied to ``model``, if any.

    Args:
        model: the UNet to look at.
    """
    return getattr(model, PATCH_ATTR, None)


def apply(
    model: nn.Module,
    recipe: Recipe | str | dict[str, Any],
    *,
    unet_map: UNetMap | None = None,
    filter_fn: Callable[[str, str], bool] | None = None,
    num_train_timesteps: int = 1000,
    force: bool = False,
) -> Patch:
    """Apply ``recipe`` to ``model`` in place and return the :class:`Patch`.

    The model must not already be patched, and must have the structure the recipe was made
    for: structure, family and stated base size (:func:`~unet_surgery.recipes.fit.check_fit`).

    Args:
        model: the UNet to patch (diffusers, LDM or any module the mapper reads).
        recipe: a :class:`Recipe`, a shipped recipe name, a file path or a parsed document.
        unet_map: the model's map, when the caller has one (saves mapping).
        filter_fn: ``filter_fn(path, op)`` narrows the selection further.
        num_train_timesteps: length of the training schedule, to read steps off timesteps.
        force: apply even to a UNet of another structure, family or base size than the recipe's.
    """
    from unet_surgery.recipes.fit import check_fit
    from unet_surgery.recipes.library import load_recipe

    if not isinstance(model, nn.Module):
        raise SurgeryError(f"apply needs a torch.nn.Module, got {type(model).__name__}")
    existing = current_patch(model)
    if existing is not None:
        raise SurgeryError(
            f"model is already patched with recipe {existing.recipe.name!r}; call patch.remove() first"
        )
    recipe = load_recipe(recipe)
    unet_map = unet_map if unet_map is not None else map_unet(model)
    check_fit(recipe, unet_map, model, force=force)
    plan = make_plan(recipe, unet_map, filter_fn)
    for reason in no_effect_reasons(recipe, plan):
        warnings.warn(f"recipe {recipe.name!r}: {reason}", NoEffectWarning, stacklevel=2)
    tracker = UNetCallTracker(num_train_timesteps=num_train_timesteps)
    patch = Patch(model, recipe, unet_map, plan, tracker)
    patch._install()
    return patch


def remove(model: nn.Module) -> None:
    """Remove whatever patch ``model`` carries (no-op if none).

    Args:
        model: the UNet whose patch to remove.
    """
    patch = current_patch(model)
    if patch is not None:
        patch.remove()
