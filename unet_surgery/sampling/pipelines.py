"""Recipes on whole diffusers pipelines: ``apply_to_pipeline(pipe, recipe)`` and the cascade front end.

A :class:`~unet_surgery.Patch` on ``pipe.unet`` already works inside the pipeline's own loop;
what the pipeline knows and the UNet does not is the sampler's timestep list and whether the
batch is ``[uncond, cond]``. :func:`apply_to_pipeline` adds exactly that, reversibly:

* ``scheduler.set_timesteps`` is wrapped (signature kept, diffusers inspects it) so every call
  forwards ``scheduler.timesteps`` to ``patch.set_timesteps``: steps are exact indices for
  any scheduler (DDIM, Karras sigmas, SVD's continuous timesteps, img2img's partial schedules);
* the pipeline's prompt/image encoder is wrapped to read the ``do_classifier_free_guidance``
  flag it is given, and noise-damped guidance is switched on for a call only when that call
  batches ``[uncond, cond]``; every supported pipeline was checked to batch in that order.

:meth:`PipelinePatch.remove` undoes all of it: the pipeline then computes bit for bit what
it computed before.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from unet_surgery.errors import RecipeError, SurgeryError
from unet_surgery.graph import UNetMap
from unet_surgery.patching.patch import Patch, apply, current_patch
from unet_surgery.recipes.schema import Recipe, SamplingSpec
from unet_surgery.sampling.cascade import (
    CascadeOutput,
    CascadeStage,
    combine_cfg,
    repeat_rows,
    self_cascade,
)

# Supported pipeline class -> the method that receives the pipeline's CFG decision.
# All of them batch the UNet input as [uncond, cond] under CFG (negative embeddings first;
# SVD: zero image embedding and zero image latents first).
SUPPORTED_PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": "encode_prompt",
    "StableDiffusionImg2ImgPipeline": "encode_prompt",
    "StableDiffusionInpaintPipeline": "encode_prompt",
    "StableDiffusionControlNetPipeline": "encode_prompt",
    "StableDiffusionControlNetImg2ImgPipeline": "encode_prompt",
    "StableDiffusionControlNetInpaintPipeline": "encode_prompt",
    "StableDiffusionXLPipeline": "encode_prompt",
    "StableDiffusionXLImg2ImgPipeline": "encode_prompt",
    "StableDiffusionXLInpaintPipeline": "encode_prompt",
    "StableDiffusionXLControlNetPipeline": "encode_prompt",
    "StableDiffusionXLControlNetImg2ImgPipeline": "encode_prompt",
    "StableDiffusionXLControlNetInpaintPipeline": "encode_prompt",
    "AnimateDiffPipeline": "encode_prompt",
    "TextToVideoSDPipeline": "encode_prompt",
    "StableVideoDiffusionPipeline": "_encode_image",
}
CASCADE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                     "StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline")


def _supported_class(pipe: Any, names: tuple[str, ...] | list[str]) -> str:
    """The pipeline's class name if it is one of ``names`` (the diffusers class itself)."""
    name = type(pipe).__name__
    try:
        import diffusers
    except ImportError as exc:  # pragma: no cover - a pipeline cannot exist without diffusers
        raise SurgeryError("pipeline integration needs diffusers") from exc
    if name in names and type(pipe) is getattr(diffusers, name, None):
        return name
    raise SurgeryError(
        f"{type(pipe).__module__}.{name} is not supported; supported pipelines: {', '.join(names)}. "
        "For another sampling loop use unet_surgery.apply(pipe.unet, recipe) and call "
        "patch.set_timesteps(...) yourself"
    )


class PipelinePatch:
    """A recipe applied to a pipeline; :meth:`remove` (or ``with``) undoes everything."""

    def __init__(self, pipe: Any, patch: Patch, encoder_name: str):
        self.pipe = pipe
        self.patch = patch
        self.scheduler = pipe.scheduler
        self.splits_cfg = patch.wants_cfg_batches  # a guidance pass (noise-damped, FouriScale's) acts on [uncond, cond] halves
        self.cfg: bool | None = None  # the last CFG decision the pipeline announced
        self._encoder_name = encoder_name
        self._saved: list[tuple[Any, str, Any]] = []  # (object, attribute, previous instance value)
        self._guard: Any = None
        self.active = False

    @property
    def recipe(self) -> Recipe:
        return self.patch.recipe

    # --- wrapping -------------------------------------------------------------------------
    def _wrap(self, obj: Any, name: str, make: Any) -> None:
        previous = obj.__dict__.get(name, _MISSING)
        original = getattr(obj, name)
        wrapper = functools.wraps(original)(make(original))
        object.__setattr__(obj, name, wrapper)
        self._saved.append((obj, name, previous))

    def _install(self) -> None:
        def set_timesteps(original: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                result = original(*args, **kwargs)
                self._after_set_timesteps()
                return result

            return wrapped

        self._wrap(self.scheduler, "set_timesteps", set_timesteps)
        if self.splits_cfg:
            def encoder(original: Any) -> Any:
                signature = inspect.signature(original)

                def wrapped(*args: Any, **kwargs: Any) -> Any:
                    try:
                        bound = signature.bind(*args, **kwargs)
                    except TypeError:  # the call itself is wrong: let the pipeline raise
                        return original(*args, **kwargs)
                    bound.apply_defaults()
                    flag = bound.arguments.get("do_classifier_free_guidance")
                    if flag is None:
                        warnings.warn(
                            f"{type(self.pipe).__name__}.{self._encoder_name} was called without "
                            "do_classifier_free_guidance; noise-damped guidance cannot tell whether "
                            "the batch is [uncond, cond] and stays off for this run",
                            UserWarning,
                            stacklevel=2,
                        )
                        self.cfg = False
                    else:
                        self.cfg = bool(flag)
                    return original(*args, **kwargs)

                return wrapped

            self._wrap(self.pipe, self._encoder_name, encoder)
        self._guard = self.patch.model.register_forward_pre_hook(self._check_scheduler)
        self.active = True

    def _check_scheduler(self, module: Any, args: Any) -> None:
        if self.pipe.scheduler is not self.scheduler:
            raise SurgeryError(
                "pipe.scheduler was replaced after apply_to_pipeline, so the patch no longer sees "
                "the timesteps; remove the patch and apply it again after changing the scheduler"
            )

    def _after_set_timesteps(self) -> None:
        self.patch.set_timesteps(self.scheduler.timesteps)
        if not self.splits_cfg:
            return
        cfg = self.cfg
        if cfg is None:  # no encoder call seen: ask the pipeline (SD-family property)
            try:
                cfg = bool(self.pipe.do_classifier_free_guidance)
            except (AttributeError, TypeError):
                warnings.warn(
                    f"{type(self.pipe).__name__} did not say whether it uses classifier-free "
                    "guidance (no encoder call before set_timesteps, no do_classifier_free_guidance "
                    "property); noise-damped guidance stays off for this run",
                    UserWarning,
                    stacklevel=2,
                )
                cfg = False
        self._set_guidance(cfg)

    def _set_guidance(self, on: bool) -> None:
        self.patch.set_cfg_batches(on)

    # --- removal --------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the UNet, the scheduler and the pipeline. Removing twice is a no-op."""
        if not self.active:
            return
        self.active = False
        if self._guard is not None:
            self._guard.remove()
        self._guard = None
        for obj, name, previous in reversed(self._saved):
            if previous is _MISSING:
                object.__delattr__(obj, name)
            else:
                object.__setattr__(obj, name, previous)
        self._saved.clear()
        self.patch.remove()

    def __enter__(self) -> PipelinePatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def report(self) -> str:
        return self.patch.report()


_MISSING = object()


def apply_to_pipeline(
    pipe: Any, recipe: Recipe | str | dict[str, Any], *, unet_map: UNetMap | None = None, force: bool = False
) -> PipelinePatch:
    """Apply ``recipe`` to ``pipe.unet`` and connect it to the pipeline's sampler.

    Raises :class:`SurgeryError` for an unsupported pipeline type (the message lists the
    supported ones) or an already patched UNet, and
    :class:`~unet_surgery.recipes.fit.RecipeMismatchError` for a recipe made for another UNet
    structure.

    Args:
        pipe: a supported diffusers pipeline (``SUPPORTED_PIPELINES``).
        recipe: a :class:`Recipe`, a shipped recipe name, a file path or a parsed document.
        unet_map: the UNet's map, when the caller has one (skips mapping).
        force: apply even to a UNet of another structure, family or base size than the recipe's.
    """
    encoder = SUPPORTED_PIPELINES[_supported_class(pipe, list(SUPPORTED_PIPELINES))]
    if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
        raise SurgeryError(f"{type(pipe).__name__} has no unet or no scheduler to patch")
    num_train = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000))
    patch = apply(pipe.unet, recipe, unet_map=unet_map, num_train_timesteps=num_train, force=force)
    pipeline_patch = PipelinePatch(pipe, patch, encoder)
    try:
        pipeline_patch._install()
    except BaseException:
        pipeline_patch.active = True
        pipeline_patch.remove()
        raise
    return pipeline_patch


# ----------------------------------------------------------------------------- cascade front end


def self_cascade_sample(
    pipe: Any,
    recipe: Recipe | str | dict[str, Any],
    *,
    prompt: str | list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 7.5,
    sampling: SamplingSpec | None = None,
    mask: Any = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    unet_map: UNetMap | None = None,
    output_type: str = "latent",
    progress: bool = True,
    executor: Any = None,
    force: bool = False,
    image: Any = None,
    controlnet_conditioning_scale: float = 1.0,
    control_guidance_end: float = 1.0,
    eta: float = 0.0,
) -> CascadeOutput:
    """FreeScale generation with an SD or SDXL pipeline: recipe passes + self-cascade.

    Takes the arguments of the pipeline's own call where they mean the same. The recipe is
    applied for the run (and removed after) unless ``pipe.unet`` already carries a patch.
    Conditioning comes from the pipeline's ``encode_prompt``; SDXL's size conditioning is the
    first stage's size for every stage, as in the official code. A recipe with a ``patches``
    section denoises every step in overlapping views
    (:func:`~unet_surgery.sampling.patchwise.patchwise_denoiser`; ``executor`` spreads them over
    processes); a one-stage ``sampling`` is then plain patch-wise text-to-image.

    With a ControlNet pipeline, ``image`` is the condition image: every stage runs the ControlNet
    on that stage's latents and on the image resized to the stage's size, as the pipeline's own
    loop does at one size (not with a ``patches`` section: views would need cropped conditions).

    Args:
        pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        recipe: a recipe with a ``sampling`` section (or give ``sampling``).
        prompt: the prompt(s), as for the pipeline.
        height: the output height in pixels; must be the cascade's last stage (default: it).
        width: the output width in pixels; must be the cascade's last stage (default: it).
        num_inference_steps: denoising steps per stage (default: the recipe's ``sampling.steps``;
            an explicit ``restart_step`` is scaled by the same ratio).
        negative_prompt: the negative prompt(s), as for the pipeline.
        prompt_embeds: ready-made prompt embeddings instead of ``prompt``.
        negative_prompt_embeds: ready-made negative embeddings.
        pooled_prompt_embeds: SDXL's pooled prompt embeddings.
        negative_pooled_prompt_embeds: SDXL's pooled negative embeddings.
        guidance_scale: classifier-free guidance scale (no guidance at 1 or below).
        sampling: overrides the recipe's sampling section.
        mask: FreeScale's region mask (1 = detail), at the final latent size or broadcastable.
        generator: the torch generator of the initial and restart noise (and of ``eta``'s).
        eta: DDIM's stochastic term, as the pipeline's own ``eta`` (0: deterministic).
        latents: the first stage's initial latents instead of drawing them.
        unet_map: the UNet's map, when the caller has one (skips mapping).
        output_type: ``"latent"`` (default), or a pipeline output type (``"pil"``, ``"np"``,
            ``"pt"``) to decode into ``CascadeOutput.images``.
        progress: show progress bars.
        executor: how patch-wise views are run (default: all in this process).
        force: apply the recipe even to a UNet of another structure, family or base size than the recipe's.
        image: ControlNet pipelines: the condition image (PIL image, array or tensor, as the pipeline takes).
        controlnet_conditioning_scale: ControlNet pipelines: the residuals' scale.
        control_guidance_end: ControlNet pipelines: the ControlNet acts on the steps ``i`` of
            ``n`` with ``(i + 1) / n <= control_guidance_end`` (the pipeline's rule), per stage.
    """
    from unet_surgery.recipes.library import load_recipe
    from unet_surgery.sampling.cascade import with_steps

    name = _supported_class(pipe, CASCADE_PIPELINES)
    recipe = load_recipe(recipe)
    spec = sampling if sampling is not None else recipe.sampling
    if spec is None:
        raise RecipeError(f"recipe {recipe.name!r} has no sampling section; pass sampling=SamplingSpec(...)")
    last_h, last_w = spec.stages[-1]
    if (height or last_h, width or last_w) != (last_h, last_w):
        raise RecipeError(
            f"height={height}, width={width}: recipe {recipe.name!r} cascades up to height={last_h}, "
            f"width={last_w}; give those or another recipe"
        )
    if num_inference_steps is not None:
        spec = with_steps(spec, num_inference_steps)
    control = None
    if "ControlNet" in name:
        if image is None:
            raise SurgeryError(f"{name} needs the ControlNet's condition image: image=...")
        if recipe.patches is not None:
            raise RecipeError(f"recipe {recipe.name!r} samples patch-wise, which does not run a ControlNet")
        control = _Control(pipe, image, float(controlnet_conditioning_scale), float(control_guidance_end))
    elif image is not None:
        raise SurgeryError(f"image= is the ControlNet's condition image; {name} has no ControlNet")
    unet = pipe.unet
    device = getattr(pipe, "_execution_device", None) or unet.device
    dtype = unet.dtype
    owned: PipelinePatch | None = None
    patch = current_patch(unet)
    if patch is None:
        owned = apply_to_pipeline(pipe, recipe, unet_map=unet_map, force=force)
        patch = owned.patch
    try:
        denoise = _pipeline_denoiser(
            pipe, name, device, dtype, spec.stages[0], guidance_scale, prompt, negative_prompt,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, control,
        )
        batch = denoise.batch
        if recipe.patches is not None:
            from unet_surgery.sampling.patchwise import patch_settings, patchwise_denoiser

            window, stride = patch_settings(recipe)
            denoise = patchwise_denoiser(denoise, window=window, stride=stride,
                                         view_batch_size=recipe.patches.view_batch_size, executor=executor)
        vae = getattr(pipe, "vae", None)
        out = self_cascade(
            denoise, pipe.scheduler, spec, latent_channels=unet.config.in_channels, batch_size=batch,
            vae=vae, vae_scale_factor=getattr(pipe, "vae_scale_factor", None) if vae is not None else recipe.vae_scale_factor,
            mask=mask, generator=generator, latents=latents, device=device, dtype=dtype, patch=patch,
            progress=progress, eta=eta,
        )
        if output_type != "latent" and vae is not None:
            from unet_surgery.sampling.cascade import vae_decode

            with torch.no_grad():
                image = vae_decode(vae, out.latents)
            out.images = pipe.image_processor.postprocess(image, output_type=output_type)
        return out
    finally:
        if owned is not None:
            owned.remove()


def _pipeline_denoiser(
    pipe: Any, name: str, device: torch.device, dtype: torch.dtype, first_stage: tuple[int, int],
    guidance_scale: float, prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any,
    pooled: Any, negative_pooled: Any, control: _Control | None = None,
) -> Any:
    """Encode the prompt once with the pipeline and return a [uncond, cond] CFG denoiser.

    SDXL's size conditioning is ``first_stage`` (original and target size). An input of several
    views of the batch (patch-wise sampling) gets the conditioning once per view, and a view
    with a crop corner (``stage.crops``, DemoFusion's local patches) that corner as its crop.
    """
    cfg = guidance_scale > 1
    with torch.no_grad():
        if name.startswith("StableDiffusionXL"):
            cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
                prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
            )
            if pipe.text_encoder_2 is None:
                projection_dim = int(pooled.shape[-1])
            else:
                projection_dim = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids(
                tuple(first_stage), (0, 0), tuple(first_stage), dtype=cond.dtype,
                text_encoder_projection_dim=projection_dim,
            ).to(device).repeat(cond.shape[0], 1)
            if cfg:
                added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
            else:
                added = {"text_embeds": pooled, "time_ids": time_ids}
        else:
            cond, uncond = pipe.encode_prompt(
                prompt, device, 1, cfg, negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
            )
            added = None
    context = torch.cat([uncond, cond]) if cfg else cond
    unet = pipe.unet

    batch = int(cond.shape[0])
    halves = 2 if cfg else 1

    def per_view(tensor: torch.Tensor, views: int) -> torch.Tensor:
        return torch.cat([repeat_rows(h, views) for h in tensor.chunk(halves)]) if views > 1 else tensor

    def denoise(x: torch.Tensor, t: torch.Tensor, stage: CascadeStage) -> torch.Tensor:
        views = x.shape[0] // batch
        model_input = torch.cat([x, x]) if cfg else x
        kwargs: dict[str, Any] = {"encoder_hidden_states": per_view(context, views), "return_dict": False}
        if added is not None:
            crops = getattr(stage, "crops", ())
            if crops:
                time_ids = torch.cat([crop_time_ids(h, crops) for h in added["time_ids"].chunk(halves)])
            else:
                time_ids = per_view(added["time_ids"], views)
            kwargs["added_cond_kwargs"] = {"text_embeds": per_view(added["text_embeds"], views), "time_ids": time_ids}
        if control is not None:
            down, mid = control.residuals(model_input, t, stage, kwargs, batch, cfg, device)
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        out = unet(model_input, t, **kwargs)[0]
        return combine_cfg(out, guidance_scale) if cfg else out

    denoise.batch = batch  # type: ignore[attr-defined]
    return denoise


class _Control:
    """A ControlNet pipeline's ControlNet inside the self-cascade: the condition image at each
    stage's size (prepared once per stage by the pipeline's own ``prepare_image``), and the
    pipeline's ``control_guidance_end`` rule on the stage's schedule."""

    def __init__(self, pipe: Any, image: Any, scale: float, end: float) -> None:
        if not 0.0 < end <= 1.0:
            raise SurgeryError(f"control_guidance_end must be in (0, 1], got {end}")
        if type(pipe.controlnet).__name__ != "ControlNetModel":
            raise SurgeryError(f"the self-cascade runs one ControlNetModel, not a {type(pipe.controlnet).__name__}")
        self.pipe, self.image, self.scale, self.end = pipe, image, scale, end
        self._prepared: dict[int, torch.Tensor] = {}

    def residuals(self, model_input: torch.Tensor, t: torch.Tensor, stage: CascadeStage, kwargs: dict[str, Any],
                  batch: int, cfg: bool, device: torch.device) -> tuple[Any, Any]:
        if model_input.shape[0] != batch * (2 if cfg else 1):
            raise SurgeryError("a ControlNet cannot run on patch-wise views (its condition would need cropping)")
        cond = self._prepared.get(stage.index)
        if cond is None:
            cond = self._prepared[stage.index] = self.pipe.prepare_image(
                image=self.image, width=stage.width, height=stage.height, batch_size=batch, num_images_per_prompt=1,
                device=device, dtype=self.pipe.controlnet.dtype, do_classifier_free_guidance=cfg, guess_mode=False,
            )
        timesteps = self.pipe.scheduler.timesteps
        i = int((timesteps == t).nonzero()[0, 0]) if (timesteps == t).any() else 0
        keep = 0.0 if (i + 1) / len(timesteps) > self.end else 1.0
        extra = {"added_cond_kwargs": kwargs["added_cond_kwargs"]} if "added_cond_kwargs" in kwargs else {}
        return self.pipe.controlnet(
            model_input, t, encoder_hidden_states=kwargs["encoder_hidden_states"], controlnet_cond=cond,
            conditioning_scale=self.scale * keep, guess_mode=False, return_dict=False, **extra,
        )


def crop_time_ids(time_ids: torch.Tensor, crops: Sequence[tuple[int, int]]) -> torch.Tensor:
    """SDXL ``time_ids`` rows, once per view, with each view's crop corner (pixels) in columns 2 and 3."""
    out = []
    for top, left in crops:
        rows = time_ids.clone()
        rows[:, 2] = top
        rows[:, 3] = left
        out.append(rows)
    return torch.cat(out)
