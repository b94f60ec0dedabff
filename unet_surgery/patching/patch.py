"""``apply(model, recipe) -> Patch`` and ``Patch.remove()``: in-place, weight-sharing rewrites.

Selected convolutions are class-swapped (:func:`unet_surgery.ops.redilate_`), so parameters,
``state_dict`` keys, LoRA loading and offloading are untouched; dispersed kernels are the only
new tensors (non-persistent buffers that follow ``.to()``). A forward pre-hook records each
UNet call's timestep and size, from which every layer reads its setting: schedules work inside
any unmodified sampling loop. ``remove()`` restores the model bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import SurgeryError
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.ops.dispersion import disperse_kernel, dispersion_transform
from unet_surgery.ops.redilate import BatchSplit, ConvSetting, is_redilated, redilate_, restore_
from unet_surgery.patching.plan import AUTO, ConvPlan, FactorPlan, Plan, auto_factor, make_plan
from unet_surgery.recipes.schema import Recipe
from unet_surgery.runtime import DAMPED, MAIN, UNetCall, UNetCallTracker

PATCH_ATTR = "_unet_surgery_patch"


class Patch:
    """A recipe applied to a model. Use :meth:`remove` or ``with apply(...):``."""

    def __init__(self, model: nn.Module, recipe: Recipe, unet_map: UNetMap, plan: Plan, tracker: UNetCallTracker):
        self.model = model
        self.recipe = recipe
        self.unet_map = unet_map
        self.plan = plan
        self.tracker = tracker
        self._modules: list[nn.Module] = []
        self._hook: Any = None
        self.guidance: Any = None
        self.active = False

    # --- schedule -----------------------------------------------------------------------
    def set_timesteps(self, timesteps: Any) -> None:
        """Give the sampler's timestep list so steps are exact (else inferred from t / T)."""
        self.tracker.set_timesteps(timesteps)

    @property
    def base_latent_hw(self) -> tuple[int, int]:
        h, w = self.recipe.base_resolution
        s = self.recipe.vae_scale_factor
        return (max(1, h // s), max(1, w // s))

    def factor_now(self, fp: FactorPlan | None, call: UNetCall | None) -> float:
        """The factor ``fp`` gives for ``call`` (1 when off)."""
        if fp is None:
            return 1.0
        factor = fp.factor
        if factor == AUTO:
            if call is None or not call.latent_hw[0]:
                return 1.0
            factor = auto_factor(call.latent_hw, self.base_latent_hw)
        schedule = fp.schedule_for(float(factor))
        if call is None or call.timestep is None:
            return float(schedule.factor) if schedule.tau is None else 1.0
        if self.tracker.timesteps and call.step is not None:
            return schedule.factor_at_step(call.step, len(self.tracker.timesteps))
        return schedule.factor_at_timestep(call.timestep, None, self.tracker.num_train_timesteps)

    def active_now(self, schedule: Any, call: UNetCall | None) -> bool:
        return self.factor_now(FactorPlan(2.0, schedule), call) != 1.0

    def branch_setting(self, conv_plan: ConvPlan, branch: str, call: UNetCall | None) -> ConvSetting:
        """A conv's setting in the main branch or the damped (noise-damped guidance) branch."""
        fp = conv_plan.damped if branch == DAMPED else conv_plan.redilate
        factor = self.factor_now(fp, call)
        use_dispersed = False
        if conv_plan.disperse is not None and factor != 1.0 and branch == MAIN:
            transform, schedule = conv_plan.disperse
            use_dispersed = self.active_now(schedule, call) and factor / transform.scale >= 1.0
        return ConvSetting(factor=factor, use_dispersed=use_dispersed)

    def conv_setting(self, conv_plan: ConvPlan) -> ConvSetting | BatchSplit:
        call = self.tracker.current
        if call is not None and call.groups:
            return BatchSplit(tuple((rows, self.branch_setting(conv_plan, branch, call)) for rows, branch in call.groups))
        return self.branch_setting(conv_plan, MAIN, call)

    # --- install / remove ---------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        try:
            for path, conv_plan in self.plan.convs.items():
                conv = model.get_submodule(path)
                dispersed = None
                scale = 0.5
                if conv_plan.disperse is not None:
                    t, _ = conv_plan.disperse
                    R = dispersion_transform(t.small, t.large, t.scale, t.input_size, t.eta)
                    with torch.no_grad():
                        dispersed = disperse_kernel(conv.weight, R)
                    scale = 1.0 / t.scale
                redilate_(conv, _setting_source(self, conv_plan), dispersed_weight=dispersed, dispersed_factor_scale=scale)
                self._modules.append(conv)
            if self.plan.attentions:
                from unet_surgery.patching.attention import install_fusion

                self._modules.extend(install_fusion(self))
            self._hook = model.register_forward_pre_hook(self.tracker.hook, with_kwargs=True)
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
        for module in reversed(self._modules):
            if is_redilated(module):
                restore_(module)
            else:
                from unet_surgery.patching.attention import restore_fusion

                restore_fusion(module)
        self._modules.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if getattr(self.model, PATCH_ATTR, None) is self:
            object.__delattr__(self.model, PATCH_ATTR)
        self.tracker.reset()
        self.active = False

    def remove(self) -> None:
        """Undo the patch. Removing twice is a no-op."""
        if self.active:
            self._uninstall()

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


def _setting_source(patch: Patch, conv_plan: ConvPlan) -> Callable[[], ConvSetting | BatchSplit]:
    return lambda: patch.conv_setting(conv_plan)


def current_patch(model: nn.Module) -> Patch | None:
    """The patch applied to ``model``, if any."""
    return getattr(model, PATCH_ATTR, None)


def apply(
    model: nn.Module,
    recipe: Recipe | str | dict[str, Any],
    *,
    unet_map: UNetMap | None = None,
    filter_fn: Callable[[str, str], bool] | None = None,
    num_train_timesteps: int = 1000,
) -> Patch:
    """Apply ``recipe`` to ``model`` in place and return the :class:`Patch`.

    ``recipe`` is a :class:`Recipe`, a shipped recipe name, a file path or a parsed document.
    ``unet_map`` saves mapping when the caller has one; ``filter_fn(path, op)`` narrows the
    selection further. The model must not already be patched.
    """
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
    plan = make_plan(recipe, unet_map, filter_fn)
    tracker = UNetCallTracker(num_train_timesteps=num_train_timesteps)
    patch = Patch(model, recipe, unet_map, plan, tracker)
    patch._install()
    return patch


def remove(model: nn.Module) -> None:
    """Remove whatever patch ``model`` carries (no-op if none)."""
    patch = current_patch(model)
    if patch is not None:
        patch.remove()
