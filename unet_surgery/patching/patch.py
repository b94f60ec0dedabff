"""``apply(model, recipe) -> Patch`` and ``Patch.remove()``: in-place, weight-sharing rewrites.

Every layer a recipe selects is planned by its passes' handlers (:mod:`unet_surgery.passes`)
and class-swapped once by its layer rewrite (:mod:`unet_surgery.ops.rewrite`), so parameters,
``state_dict`` keys and LoRA loading are untouched, and no tensor is added (dispersed kernels
are computed from the live weights while used). A forward pre-hook records each UNet call's
timestep and size and resolves every layer's setting (the handlers' contributions folded in
order) before the forward: schedules work inside any unmodified sampling loop and under
``torch.compile``. ``remove()`` restores the model bit for bit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import SurgeryError
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.ops.redilate import BatchSplit
from unet_surgery.passes.base import LayerPlan, Plan, make_plan, no_effect_reasons
from unet_surgery.recipes.schema import Recipe
from unet_surgery.runtime import MAIN, UNetCall, UNetCallTracker

PATCH_ATTR = "_unet_surgery_patch"


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
        self._hook: Any = None
        self.guidance: Any = None
        self.active = False
        self._interned: dict[Any, Any] = {}

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
        """What ``layer`` runs with on the current UNet call (a BatchSplit while guidance splits)."""
        call = self.tracker.current
        if call is not None and call.settings is not None:
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
        self.tracker.record(module, args, kwargs)
        self.resolve_settings()

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
            self._hook = model.register_forward_pre_hook(_PreForwardHook(self), with_kwargs=True)
            object.__setattr__(model, PATCH_ATTR, self)
            self.active = True
        except BaseException:
            self._uninstall()
            raise

    def enable_noise_damped_cfg(self) -> None:
        """Turn the pipeline's [uncond, cond] guidance into noise-damped guidance.

        Only for callers whose UNet batches are ``[uncond, cond]`` halves (diffusers
        pipelines with classifier-free guidance); :func:`apply_to_pipeline` does it for you.
        """
        from unet_surgery.patching.guidance import NoiseDampedGuidance

        if self.guidance is None:
            self.guidance = NoiseDampedGuidance(self)
        self.guidance.enable()

    def disable_noise_damped_cfg(self) -> None:
        if self.guidance is not None:
            self.guidance.disable()

    def _uninstall(self) -> None:
        self.disable_noise_damped_cfg()
        for module, layer in reversed(self._modules):
            layer.rewrite.restore(module)
        self._modules.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(self.model, PATCH_ATTR, None) is self:
            object.__delattr__(self.model, PATCH_ATTR)
        self._interned.clear()
        self.tracker.reset()
        self.active = False

    def remove(self) -> None:
        """Undo the patch. Removing twice is a no-op."""
        if self.active:
            self._uninstall()

    def __deepcopy__(self, memo: dict[int, Any]) -> Patch:
        """Reached through ``copy.deepcopy(model)``: the copy carries its own working patch.

        Refused while noise-damped guidance is enabled (its hooks hold per-call state that a
        copy cannot share); disable it, copy, and enable it on the copy.
        """
        import copy

        if self.guidance is not None and self.guidance._handles:
            raise SurgeryError("cannot deepcopy a model while noise-damped guidance is enabled; "
                               "call patch.disable_noise_damped_cfg() first")
        copied = Patch.__new__(Patch)
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            setattr(copied, key, copy.deepcopy(value, memo))
        return copied

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


class _PreForwardHook:
    """The patch's forward pre-hook: records the call and resolves every layer's setting.

    It runs outside any compiled graph (it reads the timestep's value): ``torch.compile(model)``
    calls a disabled hook before the compiled frame, with no graph break, so ``fullgraph=True``
    works and the graph guards on the resolved settings only. An object, not a closure, so a
    deep copy of the model calls the copy's patch.
    """

    __slots__ = ("patch",)

    def __init__(self, patch: Patch) -> None:
        self.patch = patch

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.patch._pre_forward(module, args, kwargs)


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
    for (:func:`~unet_surgery.recipes.fit.check_fit`; another stated base size warns).

    Args:
        model: the UNet to patch (diffusers, LDM or any module the mapper reads).
        recipe: a :class:`Recipe`, a shipped recipe name, a file path or a parsed document.
        unet_map: the model's map, when the caller has one (saves mapping).
        filter_fn: ``filter_fn(path, op)`` narrows the selection further.
        num_train_timesteps: length of the training schedule, to read steps off timesteps.
        force: apply even to a UNet of another structure than the recipe's.
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
