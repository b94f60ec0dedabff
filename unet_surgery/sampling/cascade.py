"""FreeScale's tailored self-cascade sampler, around a small denoise callback.

Stage 1 is a plain generation at the first size. Every later stage upsamples the previous
result (decode, bicubic resize, encode; or a direct resize for pixel-space models), noises it
to every timestep of the schedule with one noise tensor, restarts at ``restart_step`` and,
before each later denoising step at timestep ``t``, pulls the latents towards the noised
upsampled image:

    c = (0.5 * (1 + cos(pi * (T - t) / T))) ** s        latents = latents * (1 - c) + x_t * c

with ``s = cosine_scale``, or per pixel ``s = mask * cosine_scale + (1 - mask) * cosine_scale_bg``
when a detail mask is given (region-aware detail control). The early, noisy steps are thus
anchored to the upsampled layout and the late steps free to add detail.

The sampler knows nothing about prompts or UNet signatures: a :data:`Denoiser` gets the
scheduler-scaled model input, the timestep and the :class:`CascadeStage` and returns the
(guided) model output. :func:`cfg_denoiser` builds one for a bare UNet; ``pipelines`` builds one
from an SD or SDXL pipeline. Restrained dilation and scale fusion come from the recipe's passes
applied to the UNet (``factor: auto`` follows the stage size); the sampler only tells the patch
the timesteps of each stage.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unet_surgery.errors import RecipeError, SurgeryError
from unet_surgery.recipes.schema import Recipe, SamplingSpec


@dataclass(frozen=True)
class CascadeStage:
    """One stage of the cascade, as the denoise callback sees it."""

    index: int
    height: int  # pixels
    width: int
    latent_hw: tuple[int, int]
    restart_step: int  # 0 for the first stage


Denoiser = Callable[[torch.Tensor, torch.Tensor, CascadeStage], torch.Tensor]


@dataclass
class CascadeOutput:
    """The final latents and each stage's result (``stage_latents[-1] is latents``)."""

    latents: torch.Tensor
    stage_latents: list[torch.Tensor] = field(default_factory=list)
    images: Any = None  # filled by the pipeline front end when an image output is asked for


# ----------------------------------------------------------------------------- validation


def sampling_spec(source: Recipe | SamplingSpec) -> SamplingSpec:
    """The sampling section of a recipe, validated (a hand-built spec skips the parser)."""
    spec = source.sampling if isinstance(source, Recipe) else source
    if spec is None:
        name = source.name if isinstance(source, Recipe) else "?"
        raise RecipeError(f"recipe {name!r} has no sampling section (stages, steps, restart_step, ...)")
    if not isinstance(spec, SamplingSpec):
        raise RecipeError(f"expected a Recipe or SamplingSpec, got {type(spec).__name__}")
    if not spec.stages:
        raise RecipeError("sampling.stages: at least one stage is required")
    for i, (h, w) in enumerate(spec.stages):
        if h <= 0 or w <= 0:
            raise RecipeError(f"sampling.stages[{i}]: sizes must be positive, got {[h, w]}")
    for i, (a, b) in enumerate(zip(spec.stages, spec.stages[1:], strict=False)):
        if b[0] < a[0] or b[1] < a[1]:
            raise RecipeError(f"sampling.stages[{i + 1}]: stages must not shrink: {list(a)} -> {list(b)}")
    if spec.steps < 1:
        raise RecipeError(f"sampling.steps: must be >= 1, got {spec.steps}")
    restart = restart_step_of(spec)
    if not 0 <= restart < spec.steps:
        raise RecipeError(
            f"sampling.restart_step: must be in [0, {spec.steps}) (a step of the {spec.steps}-step "
            f"schedule), got {restart}"
        )
    for name in ("cosine_scale", "cosine_scale_bg"):
        value = getattr(spec, name)
        if not math.isfinite(value) or value < 0:
            raise RecipeError(f"sampling.{name}: must be a finite number >= 0, got {value}")
    return spec


def with_steps(spec: SamplingSpec, steps: int) -> SamplingSpec:
    """``spec`` run with ``steps`` per stage; an explicit ``restart_step`` is scaled by the same ratio."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RecipeError(f"num_inference_steps: {steps!r} is not a positive number of steps")
    if spec.steps == steps:
        return spec
    restart = None if spec.restart_step is None else min(steps - 1, round(spec.restart_step * steps / spec.steps))
    return replace(spec, steps=steps, restart_step=restart)


def restart_step_of(spec: SamplingSpec) -> int:
    """The restart step: the spec's, else FreeScale's default int(0.3 * steps)."""
    return spec.restart_step if spec.restart_step is not None else int(0.3 * spec.steps)


def _as_mask(mask: Any, batch: int, final_hw: tuple[int, int]) -> torch.Tensor:
    """A detail mask as a (1 or B, 1, H, W) float tensor in [0, 1], or a clear error."""
    m = torch.as_tensor(mask)
    if m.dtype == torch.bool:
        m = m.float()
    if not m.is_floating_point():
        raise SurgeryError(f"mask must hold floats in [0, 1], got dtype {m.dtype}")
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:  # (N, H, W): one mask per sample, or one for all
        m = m[:, None]
    elif m.dim() != 4:
        raise SurgeryError(f"mask must be (H, W), (1, H, W) or (B, 1, H, W), got shape {tuple(m.shape)}")
    if m.shape[1] != 1:
        raise SurgeryError(f"mask must have one channel, got shape {tuple(m.shape)}")
    if m.shape[0] not in (1, batch):
        raise SurgeryError(
            f"mask batch {m.shape[0]} does not match the batch {batch} (use 1 or {batch}); "
            "masks are (H, W), (N, H, W) or (N, 1, H, W)"
        )
    if m.shape[-2] < 1 or m.shape[-1] < 1:
        raise SurgeryError(f"mask is empty: shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise SurgeryError(f"mask values must lie in [0, 1], got [{float(m.min()):g}, {float(m.max()):g}]")
    aspect, want = m.shape[-1] / m.shape[-2], final_hw[1] / final_hw[0]
    if abs(aspect / want - 1) > 0.02:
        raise SurgeryError(
            f"mask of {m.shape[-2]}x{m.shape[-1]} does not fit the {final_hw[0]}x{final_hw[1]} output "
            "(aspect ratios differ); give a mask of the output's shape"
        )
    return m


def cosine_blend_factor(t: torch.Tensor | float, num_train_timesteps: int, exponent: Any) -> Any:
    """c = (0.5 * (1 + cos(pi * (T - t) / T))) ** exponent; ``exponent`` may be a per-pixel map."""
    base = 0.5 * (1 + math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps))
    if isinstance(exponent, torch.Tensor):
        return torch.pow(torch.as_tensor(base, dtype=torch.float64), exponent.double())
    return base**exponent


# ----------------------------------------------------------------------------- helpers


def _progress(iterable: Iterable[Any], enabled: bool, desc: str, total: int) -> Iterator[Any]:
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with diffusers; without it, no bar
            pass
        else:
            yield from tqdm(iterable, desc=desc, total=total)
            return
    yield from iterable


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn on the generator's device (reproducible across devices), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def initial_latents(shape: tuple[int, ...], latents: torch.Tensor | None, generator: torch.Generator | None,
                    device: torch.device, dtype: torch.dtype, *, what: str = "stage 1",
                    error: type[SurgeryError] = SurgeryError) -> torch.Tensor:
    """The first stage's starting noise: ``latents`` (checked against ``shape``) or a fresh draw."""
    if latents is None:
        return _randn(shape, generator, device, dtype)
    if tuple(latents.shape) != shape:
        raise error(f"latents must have shape {shape} for {what}, got {tuple(latents.shape)}")
    return latents.to(device=device, dtype=dtype)


def _step_kwargs(scheduler: Any, generator: torch.Generator | None, eta: float = 0.0) -> dict[str, Any]:
    """The ``scheduler.step`` keywords it takes: the generator, and DDIM's ``eta`` when not 0."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {"generator": generator} if "generator" in params else {}
    if eta:
        if "eta" not in params:
            raise ValueError(f"eta={eta}: {type(scheduler).__name__}.step takes no eta (DDIM does)")
        kwargs["eta"] = eta
    return kwargs


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (scaled for the UNet) to an image in [-1, 1]."""
    cfg = vae.config
    z = latents.to(_module_dtype(vae)) / cfg.scaling_factor
    if getattr(cfg, "shift_factor", None):
        z = z + cfg.shift_factor
    out = vae.decode(z, return_dict=False)[0]
    return out


def vae_encode(vae: Any, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """An image to UNet latents by sampling the posterior (as FreeScale does)."""
    cfg = vae.config
    posterior = vae.encode(image.to(_module_dtype(vae))).latent_dist
    z = posterior.sample(generator=generator)
    if getattr(cfg, "shift_factor", None):
        z = z - cfg.shift_factor
    return z * cfg.scaling_factor


# ----------------------------------------------------------------------------- the sampler


def self_cascade(
    denoise: Denoiser,
    scheduler: Any,
    sampling: Recipe | SamplingSpec,
    *,
    latent_channels: int,
    batch_size: int = 1,
    vae: Any = None,
    vae_scale_factor: int | None = None,
    mask: Any = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    patch: Any = None,
    progress: bool = True,
    eta: float = 0.0,
) -> CascadeOutput:
    """Run the self-cascade and return the latents of every stage.

    ``denoise(model_input, t, stage)`` returns the model output the scheduler expects (noise
    for epsilon models), guidance included. ``vae=None`` skips the VAE: stages resize the
    samples directly (pixel-space models) and ``vae_scale_factor`` defaults to the recipe's
    (1 for a bare SamplingSpec). ``latents`` is the
    stage-1 starting noise (else drawn from ``generator``); ``device``/``dtype`` default to
    those of ``latents``, then of the VAE, then CPU float32. ``patch`` (a :class:`Patch`) is
    told each stage's timesteps; a pipeline patched with ``apply_to_pipeline`` is told anyway.

    Args:
        denoise: ``denoise(model_input, t, stage)``: the model output the scheduler expects, guidance
            included.
        scheduler: a diffusers scheduler (its ``set_timesteps`` and ``step`` are used per stage).
        sampling: a recipe with a ``sampling`` section, or a :class:`SamplingSpec`.
        latent_channels: channels of the latents the model denoises.
        batch_size: images per run.
        vae: the VAE that moves samples between stages (None: pixel-space, resize directly).
        vae_scale_factor: pixels per latent pixel (default: the VAE's, else the recipe's).
        mask: FreeScale's region mask (1 = detail), at the final size or broadcastable.
        generator: the torch generator of the initial and restart noise.
        latents: the first stage's initial latents instead of drawing them.
        device: where to sample (default: that of ``latents``, then the VAE, then CPU).
        dtype: the latents' dtype (same defaults as ``device``).
        patch: a :class:`~unet_surgery.Patch` told each stage's timesteps.
        progress: show progress bars.
        eta: DDIM's stochastic term for every stage's steps (0: deterministic, FreeScale's
            default; 1: ancestral), its noise from ``generator``. Other schedulers refuse it.
    """
    if not (math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    spec = sampling_spec(sampling)
    if vae_scale_factor is None:
        if vae is None:  # sizes of a latent model without its VAE: the recipe says how to scale
            vae_scale_factor = sampling.vae_scale_factor if isinstance(sampling, Recipe) else 1
        else:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for i, (h, w) in enumerate(spec.stages):
        if h % vae_scale_factor or w % vae_scale_factor:
            raise RecipeError(
                f"sampling.stages[{i}]: {h}x{w} is not a multiple of the VAE scale factor {vae_scale_factor}"
            )
    if latents is not None:
        device = latents.device if device is None else device
        dtype = latents.dtype if dtype is None else dtype
    elif vae is not None:
        param = next(vae.parameters())
        device = param.device if device is None else device
        dtype = param.dtype if dtype is None else dtype
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype if dtype is not None else torch.float32
    T = int(scheduler.config.num_train_timesteps)
    steps = spec.steps
    restart = restart_step_of(spec)
    order = int(getattr(scheduler, "order", 1))
    final_hw = spec.stages[-1]
    mask_t = None if mask is None else _as_mask(mask, batch_size, final_hw).to(device)
    step_kwargs = _step_kwargs(scheduler, generator, eta)

    def set_timesteps() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        if patch is not None:
            patch.set_timesteps(scheduler.timesteps)
        return scheduler.timesteps

    def run(x: torch.Tensor, stage: CascadeStage, start: int, anchors: list[torch.Tensor] | None,
            exponent: Any) -> torch.Tensor:
        timesteps = scheduler.timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        desc = f"stage {stage.index + 1}/{len(spec.stages)} {stage.height}x{stage.width}"
        todo = range(start, len(timesteps))
        for i in _progress(todo, progress, desc, len(todo)):
            t = timesteps[i]
            first_order = getattr(scheduler, "state_in_first_order", True)
            if anchors is not None and first_order:
                c = cosine_blend_factor(t, T, exponent)
                c = c.to(device=device, dtype=x.dtype) if isinstance(c, torch.Tensor) else c
                x = x * (1 - c) + anchors[i] * c
            model_input = scheduler.scale_model_input(x, t)
            out = denoise(model_input, t, stage)
            x = scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        return x

    results: list[torch.Tensor] = []
    with torch.no_grad():
        # --- stage 1: plain generation
        h, w = spec.stages[0]
        hw = (h // vae_scale_factor, w // vae_scale_factor)
        set_timesteps()
        x = initial_latents((batch_size, latent_channels, *hw), latents, generator, device, dtype)
        x = x * scheduler.init_noise_sigma
        x = run(x, CascadeStage(0, h, w, hw, 0), 0, None, None)
        results.append(x)

        # --- later stages: upsample, re-noise, restart with the cosine blend
        for index, (h, w) in enumerate(spec.stages[1:], start=1):
            hw = (h // vae_scale_factor, w // vae_scale_factor)
            if vae is None:
                x0 = F.interpolate(x, size=hw, mode="bicubic")
            else:
                image = vae_decode(vae, x)
                image = F.interpolate(image, size=(h, w), mode="bicubic")
                x0 = vae_encode(vae, image, generator).to(dtype)
            timesteps = set_timesteps()
            noise = _randn(tuple(x0.shape), generator, device, dtype)
            # add_noise looks t up in the schedule only while no begin index is set
            anchors = [scheduler.add_noise(x0, noise, t.reshape(1)) for t in timesteps]
            if mask_t is None:
                exponent: Any = spec.cosine_scale
            else:
                m = F.interpolate(mask_t.to(torch.float64), size=hw, mode="nearest")
                exponent = m * spec.cosine_scale + (1 - m) * spec.cosine_scale_bg
            start = restart * order
            x = anchors[start]
            x = run(x, CascadeStage(index, h, w, hw, restart), start, anchors, exponent)
            results.append(x)
    return CascadeOutput(latents=results[-1], stage_latents=results)


def combine_cfg(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance of a ``[uncond, cond]`` batch: ``u + w * (c - u)``.

    The one place the combination is written (the pipelines, the cascade denoisers and the
    noise-damped guidance tests all rely on this exact order of operations).
    """
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def repeat_rows(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """``tensor`` stacked ``times`` times along the batch (one copy per view, view-major)."""
    return tensor if times == 1 else tensor.repeat(times, *([1] * (tensor.dim() - 1)))


def cfg_denoiser(
    unet: nn.Module,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    *,
    guidance_scale: float = 7.5,
    added_cond_kwargs: dict[str, torch.Tensor] | Callable[[CascadeStage], dict[str, torch.Tensor]] | None = None,
    **unet_kwargs: Any,
) -> Denoiser:
    """A denoiser for a bare diffusers UNet with classifier-free guidance.

    The batch is ``[uncond, cond]`` like diffusers pipelines build it, so a patch with
    noise-damped guidance enabled sees what it expects. ``added_cond_kwargs`` (SDXL) are
    batched like the UNet input (``[uncond, cond]`` rows when guiding), or a function of the
    stage that returns them; ``uncond=None`` or ``guidance_scale <= 1`` runs without guidance.
    An input of several views of the batch (patch-wise sampling) gets the conditioning once per
    view; ``added_cond_kwargs`` of one view are repeated likewise, those with a row per input row
    are taken as they are.

    Args:
        unet: a diffusers UNet.
        cond: the prompt's encoder hidden states.
        uncond: the negative prompt's (None: no guidance).
        guidance_scale: classifier-free guidance scale (no guidance at 1 or below).
        added_cond_kwargs: SDXL's added conditioning, or a function of the stage returning it.
        **unet_kwargs: further keyword arguments of every UNet call.
    """
    use_cfg = uncond is not None and guidance_scale > 1
    negative: torch.Tensor = uncond if uncond is not None else cond

    def denoise(x: torch.Tensor, t: torch.Tensor, stage: CascadeStage) -> torch.Tensor:
        extra = added_cond_kwargs(stage) if callable(added_cond_kwargs) else added_cond_kwargs
        views = x.shape[0] // cond.shape[0]  # patch-wise: several views of the batch, view-major
        if use_cfg:
            model_input = torch.cat([x, x])
            context = torch.cat([repeat_rows(negative, views), repeat_rows(cond, views)])
        else:
            model_input, context = x, repeat_rows(cond, views)
        kwargs = dict(unet_kwargs)
        if extra is not None:
            rows = model_input.shape[0]
            halves = 2 if use_cfg else 1
            kwargs["added_cond_kwargs"] = {
                k: v if v.shape[0] == rows else torch.cat([repeat_rows(h, views) for h in v.chunk(halves)])
                for k, v in extra.items()
            }
        out = unet(model_input, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        return combine_cfg(out, guidance_scale) if use_cfg else out

    return denoise
