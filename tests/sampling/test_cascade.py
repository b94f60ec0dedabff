"""Self-cascade sampler: equal to a literal transcription of FreeScale's formulas, masks, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import preset_map
from tests.pipelines import tiny_pipelines as tp
from unet_surgery import RecipeError, SurgeryError, current_patch, load_recipe
from unet_surgery.presets import build_unet
from unet_surgery.recipes.schema import SamplingSpec
from unet_surgery.sampling import cfg_denoiser, self_cascade, self_cascade_sample

pytestmark = pytest.mark.filterwarnings("ignore")

SPEC = SamplingSpec(stages=((64, 64), (128, 128)), steps=4, restart_step=1, cosine_scale=2.0, cosine_scale_bg=0.5)
W = 4.0


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def parts():
    unet = build_unet("sd15", size="tiny", device="cpu")
    cond = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    uncond = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    return unet, tp.tiny_vae(), cond, uncond


def literal(unet, vae, scheduler, cond, uncond, spec, mask=None, seed=0, vsf=8, eta=0.0):
    """FreeScale's self-cascade written out step by step (shared reference README); ``eta``
    as diffusers' DDIM pipeline passes it, with the run's generator."""
    g = torch.Generator().manual_seed(seed)
    step_kw = {"eta": eta, "generator": g} if eta else {}
    T = scheduler.config.num_train_timesteps

    def eps(x, t):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        return u + W * (c - u)

    h, w = spec.stages[0]
    scheduler.set_timesteps(spec.steps)
    x = torch.randn(1, 4, h // vsf, w // vsf, generator=g) * scheduler.init_noise_sigma
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    for t in scheduler.timesteps:
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), t), t, x, **step_kw).prev_sample
    for h, w in spec.stages[1:]:
        if vae is None:
            x0 = F.interpolate(x, size=(h // vsf, w // vsf), mode="bicubic")
        else:
            image = vae.decode(x / vae.config.scaling_factor).sample
            image = F.interpolate(image, size=(h, w), mode="bicubic")
            x0 = vae.encode(image).latent_dist.sample(generator=g) * vae.config.scaling_factor
        scheduler.set_timesteps(spec.steps)
        noise = torch.randn(x0.shape, generator=g)
        x_t = [scheduler.add_noise(x0, noise, t.reshape(1)) for t in scheduler.timesteps]
        r = spec.restart_step if spec.restart_step is not None else int(0.3 * spec.steps)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(r)
        x = x_t[r]
        for i, t in enumerate(scheduler.timesteps):
            if i < r:
                continue
            base = 0.5 * (1 + math.cos(math.pi * (T - float(t)) / T))
            if mask is None:
                c = base**spec.cosine_scale
            else:
                m = F.interpolate(mask.double(), size=x.shape[-2:], mode="nearest")
                c = (base ** (m * spec.cosine_scale + (1 - m) * spec.cosine_scale_bg)).float()
            x = x * (1 - c) + x_t[i] * c
            x = scheduler.step(eps(scheduler.scale_model_input(x, t), t), t, x, **step_kw).prev_sample
    return x


def cascade(parts, scheduler, spec=SPEC, mask=None, vae="default", seed=0, **kw):
    unet, tiny_vae, cond, uncond = parts
    vae = tiny_vae if vae == "default" else vae
    return self_cascade(
        cfg_denoiser(unet, cond, uncond, guidance_scale=W), scheduler, spec, latent_channels=4, vae=vae,
        vae_scale_factor=8, mask=mask, generator=torch.Generator().manual_seed(seed), progress=False, **kw,
    )


@pytest.mark.parametrize("make_scheduler", [ddim, euler])
@pytest.mark.parametrize("with_vae", [True, False])
def test_cascade_equals_the_literal_formulas(parts, make_scheduler, with_vae) -> None:
    unet, vae, cond, uncond = parts
    out = cascade(parts, make_scheduler(), vae=vae if with_vae else None)
    with torch.no_grad():
        ref = literal(unet, vae if with_vae else None, make_scheduler(), cond, uncond, SPEC)
    assert out.latents.shape == (1, 4, 16, 16) and [s.shape[-1] for s in out.stage_latents] == [8, 16]
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)


def test_eta_is_ddims_stochastic_step_with_the_runs_generator(parts) -> None:
    unet, vae, cond, uncond = parts
    out = cascade(parts, ddim(), eta=1.0)
    with torch.no_grad():
        ref = literal(unet, vae, ddim(), cond, uncond, SPEC, eta=1.0)
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.latents, cascade(parts, ddim()).latents, atol=1e-3)  # eta 0 differs


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_out_of_range_is_refused(parts, eta) -> None:
    with pytest.raises(ValueError, match="eta must be in"):
        cascade(parts, ddim(), eta=eta)


def test_eta_on_a_scheduler_without_it_is_refused(parts) -> None:
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler\.step takes no eta"):
        cascade(parts, euler(), eta=0.5)


def test_mask_sets_the_exponent_per_pixel(parts) -> None:
    unet, vae, cond, uncond = parts
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :, 64:] = 1.0  # detail (cosine_scale) on the right half, background on the left
    mask[..., 100:, :20] = 0.25
    out = cascade(parts, ddim(), mask=mask)
    with torch.no_grad():
        ref = literal(unet, vae, ddim(), cond, uncond, SPEC, mask=mask)
    torch.testing.assert_close(out.latents, ref, rtol=1e-5, atol=1e-5)
    # a mask of ones is cosine_scale everywhere, zeros cosine_scale_bg everywhere
    ones = cascade(parts, ddim(), mask=torch.ones(64, 64)).latents
    torch.testing.assert_close(ones, cascade(parts, ddim()).latents, rtol=1e-5, atol=1e-5)
    zeros = cascade(parts, ddim(), mask=torch.zeros(32, 32)).latents
    bg = dataclasses.replace(SPEC, cosine_scale=SPEC.cosine_scale_bg)
    torch.testing.assert_close(zeros, cascade(parts, ddim(), spec=bg).latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ones, zeros, atol=1e-4)


def test_default_restart_step_is_thirty_percent(parts) -> None:
    spec = dataclasses.replace(SPEC, steps=10, restart_step=None)
    calls: list[float] = []
    unet, vae, cond, uncond = parts
    base = cfg_denoiser(unet, cond, uncond, guidance_scale=W)

    def spy(x, t, stage):
        calls.append((stage.index, stage.restart_step))
        return base(x, t, stage)

    self_cascade(spy, ddim(), spec, latent_channels=4, vae=vae, progress=False)
    assert calls.count((0, 0)) == 10 and calls.count((1, 3)) == 7  # int(0.3 * 10) = 3


def test_other_schedulers_run(parts) -> None:
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

    for scheduler in (DPMSolverMultistepScheduler(), HeunDiscreteScheduler()):
        out = cascade(parts, scheduler)
        assert out.latents.shape == (1, 4, 16, 16) and torch.isfinite(out.latents).all()


def test_three_stages_and_a_progress_bar_per_stage(parts, capsys) -> None:
    spec = dataclasses.replace(SPEC, stages=((64, 64), (96, 128), (128, 192)), steps=2, restart_step=1)
    out = self_cascade(cfg_denoiser(parts[0], parts[2]), ddim(), spec, latent_channels=4, vae=parts[1])
    assert [tuple(s.shape[-2:]) for s in out.stage_latents] == [(8, 8), (12, 16), (16, 24)]
    err = capsys.readouterr().err
    assert "stage 1/3 64x64" in err and "stage 3/3 128x192" in err


def test_freescale_recipe_dilates_later_stages_only() -> None:
    """factor: auto gives 1 at the base size and size // base at the next stage, while step < tau."""
    pipe, kwargs = tp.sd()
    recipe = load_recipe("freescale-sdxl-2048x2048")
    doc = {"name": "fs-test", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
           "passes": [{"type": "redilate", "select": {"kernel": 3, "level": "1..", "stage": ["down", "mid"]},
                       "factor": "auto", "schedule": {"tau": 35, "steps": 50}},
                      {"type": "scale_fusion", "select": {"op": ["attention"], "kind": ["self"]}}],
           "sampling": {"stages": [[64, 64], [128, 128]], "steps": 10, "restart_step": 3}}
    assert recipe.sampling is not None and recipe.sampling.restart_step == 15
    seen: list[tuple[int, int, float]] = []
    conv = pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1")  # kernel 3, level 1, down: selected

    def spy(module, args, out):
        """The factor this conv really ran with: its output is torch's 3x3 conv with dilation and
        padding that factor (the plain conv at 1)."""
        call = current_patch(pipe.unet).tracker.current
        ran = [d for d in (1, 2, 3)
               if torch.equal(out, F.conv2d(args[0], module.weight, module.bias, 1, padding=d, dilation=d))]
        seen.append((call.latent_hw[0], call.step, float(ran[0]) if len(ran) == 1 else float("nan")))

    handle = conv.register_forward_hook(spy)
    out = self_cascade_sample(pipe, doc, prompt_embeds=kwargs["prompt_embeds"],
                              negative_prompt_embeds=kwargs["negative_prompt_embeds"], guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(0), unet_map=preset_map("sd15", "tiny"),
                              progress=False)
    handle.remove()
    assert current_patch(pipe.unet) is None and "set_timesteps" not in vars(pipe.scheduler)
    assert out.latents.shape == (1, 4, 16, 16)
    assert conv is pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1") and len(seen) == 17
    stage1 = [f for hw, _, f in seen if hw == 8]
    stage2 = [(i, f) for hw, i, f in seen if hw == 16]
    assert stage1 == [1.0] * 10
    assert stage2 == [(i, 2.0 if i < 7 else 1.0) for i in range(3, 10)]  # tau 35/50 of 10 steps = 7


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pipeline_front_end_matches_the_bare_sampler(eta) -> None:
    pipe, kwargs = tp.sd()
    doc = {"name": "fs-sd", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
           "passes": [{"type": "redilate", "select": {"kernel": 3, "level": "1.."}, "factor": "auto"}],
           "sampling": {"stages": [[64, 64], [128, 128]], "steps": 4, "restart_step": 1}}
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = self_cascade_sample(pipe, doc, prompt_embeds=kwargs["prompt_embeds"],
                              negative_prompt_embeds=kwargs["negative_prompt_embeds"], guidance_scale=W,
                              generator=g(), unet_map=preset_map("sd15", "tiny"), progress=False,
                              output_type="pt", eta=eta)
    assert out.images.shape == (1, 3, 128, 128)
    from unet_surgery import apply

    with apply(pipe.unet, doc, unet_map=preset_map("sd15", "tiny")) as patch:
        bare = self_cascade(cfg_denoiser(pipe.unet, kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"],
                                         guidance_scale=W), pipe.scheduler, load_recipe(doc),
                            latent_channels=4, vae=pipe.vae, generator=g(), patch=patch, progress=False,
                            eta=eta)
    assert torch.equal(out.latents, bare.latents)


def test_sdxl_pipeline_cascade_matches_the_bare_sampler_with_diffusers_conditioning() -> None:
    """The SDXL front end conditions as diffusers' SDXL pipeline does: pooled embeddings and
    ``time_ids`` batched ``[negative, positive]``, ``time_ids`` = original size, crop corner
    (0, 0), target size (``_get_add_time_ids``), here the first stage's 128x128."""
    from unet_surgery import apply

    pipe, kwargs = tp.sdxl()
    doc = load_recipe("freescale-sdxl-2048x2048")
    spec = SamplingSpec(stages=((128, 128), (256, 256)), steps=3, restart_step=1)
    tiny = dataclasses.replace(doc, base_resolution=(128, 128), target_resolutions=((256, 256),), sampling=spec)
    embeds = {k: kwargs[k] for k in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                     "negative_pooled_prompt_embeds")}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = self_cascade_sample(pipe, tiny, guidance_scale=5.0, generator=g(), unet_map=preset_map("sdxl", "tiny"),
                              progress=False, **embeds)
    assert out.latents.shape == (1, 4, 32, 32) and torch.isfinite(out.latents).all()
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    added = {"text_embeds": torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]),
             "time_ids": torch.cat([time_ids, time_ids])}
    with apply(pipe.unet, tiny, unet_map=preset_map("sdxl", "tiny")) as patch:
        bare = self_cascade(cfg_denoiser(pipe.unet, embeds["prompt_embeds"], embeds["negative_prompt_embeds"],
                                         guidance_scale=5.0, added_cond_kwargs=added),
                            pipe.scheduler, tiny, latent_channels=4, vae=pipe.vae, generator=g(), patch=patch,
                            progress=False)
    assert torch.equal(out.latents, bare.latents)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (torch.ones(1, 3, 128, 128), "one channel"),
        (torch.ones(3, 1, 128, 128), "mask batch 3"),
        (torch.full((128, 128), 1.5), r"\[0, 1\]"),
        (torch.full((128, 128), -0.1), r"\[0, 1\]"),
        (torch.full((128, 128), float("nan")), r"\[0, 1\]"),
        (torch.ones(64, 128), "aspect ratios differ"),
        (torch.ones(1, 1, 1, 128, 128), "shape"),
        (torch.ones(128, 128, dtype=torch.long), "floats"),
    ],
)
def test_bad_masks_are_refused(parts, mask, match) -> None:
    with pytest.raises(SurgeryError, match=match):
        cascade(parts, ddim(), mask=mask)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (dataclasses.replace(SPEC, stages=((128, 128), (64, 64))), "must not shrink"),
        (dataclasses.replace(SPEC, stages=((64, 64), (128, 32))), "must not shrink"),  # taller, narrower
        (dataclasses.replace(SPEC, restart_step=4), r"restart_step: must be in \[0, 4\)"),
        (dataclasses.replace(SPEC, restart_step=-1), "restart_step"),
        (dataclasses.replace(SPEC, stages=((64, 64), (100, 100))), "not a multiple"),
        (dataclasses.replace(SPEC, cosine_scale=-1.0), "cosine_scale"),
    ],
)
def test_bad_sampling_settings_are_refused(parts, spec, match) -> None:
    with pytest.raises(RecipeError, match=match):
        cascade(parts, ddim(), spec=spec)


def test_shrinking_stages_in_a_recipe_document_are_refused() -> None:
    doc = {"name": "x", "base_resolution": [64, 64], "target_resolutions": [[128, 128]],
           "passes": [{"type": "redilate", "select": {}, "factor": 2}],
           "sampling": {"stages": [[128, 128], [64, 128]]}}
    with pytest.raises(RecipeError, match="must not shrink"):
        load_recipe(doc)


def test_cascade_front_end_refuses_other_pipelines_and_recipes_without_sampling() -> None:
    pipe, kwargs = tp.sd_img2img()
    with pytest.raises(SurgeryError, match="StableDiffusionImg2ImgPipeline is not supported"):
        self_cascade_sample(pipe, "freescale-sdxl-2048x2048")
    pipe, kwargs = tp.sd()
    with pytest.raises(RecipeError, match="no sampling section"):
        self_cascade_sample(pipe, "scalecrafter-sd15-1024x1024", prompt_embeds=kwargs["prompt_embeds"])
    assert current_patch(pipe.unet) is None


@pytest.mark.parametrize(
    ("restart", "steps", "expected"),
    [(15, 10, 3), (15, 100, 30), (49, 10, 9), (None, 10, None)],
)
def test_a_recipe_run_with_other_steps_keeps_the_restart_at_the_same_fraction(restart, steps, expected) -> None:
    """FreeScale restarts at 15 of 50 steps: 3 of 10, 30 of 100; a restart at the last step stays
    at the last step (9 of 10, not 10, which does not exist); the default stays 0.3 * steps."""
    from unet_surgery.sampling.cascade import with_steps

    spec = SamplingSpec(stages=((64, 64), (128, 128)), steps=50, restart_step=restart)
    assert with_steps(spec, steps) == SamplingSpec(stages=spec.stages, steps=steps, restart_step=expected)
