# ruff: noqa: B007, B905, RUF005  (the transcription keeps the official loops and expressions as written)
"""DemoFusion equals a literal transcription of the official pipeline on tiny float64 UNets.

Oracle: PRIS-CV/DemoFusion ``pipeline_demofusion_sdxl.py`` (commit 5024487), ``get_views``,
``gaussian_kernel``/``gaussian_filter``, ``tiled_decode`` and the denoising part of
``__call__`` (from ``set_timesteps`` to the per-phase renormalisation), transcribed below with
the prompt encoding left out (embeddings are given) and ``output_type="latent"``. The official
code draws its noise inversion from torch's global RNG and its jitter from Python's ``random``;
the test seeds both with the values our sampler is given (a generator and a jitter seed).

Tolerance 1e-10 in float64: the official code steps every view and averages stepped latents,
we average model outputs and step once (the same number for DDIM, up to float64 rounding). The
cosine factor and Gaussian kernel are float32 in both (integer timesteps), so that rounding is
shared, not a tolerance. The multi-decoder accumulates into a float32 image in the official
code (``torch.zeros(...)`` of the default dtype): compared to float32 rounding, 1e-6.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from unet_surgery.presets import build_unet
from unet_surgery.recipes.schema import DemoFusionSpec
from unet_surgery.sampling.cascade import cfg_denoiser
from unet_surgery.sampling.demofusion import demofusion, phases, tiled_decode
from unet_surgery.sampling.patchwise import PatchError, view_grid

pytestmark = pytest.mark.filterwarnings("ignore")
GUIDANCE = 5.0


# ----------------------------------------------------------------------------- transcription


def official_get_views(height, width, window_size=128, stride=64, random_jitter=False, vae_scale_factor=8):
    height //= vae_scale_factor
    width //= vae_scale_factor
    num_blocks_height = int((height - window_size) / stride - 1e-6) + 2 if height > window_size else 1
    num_blocks_width = int((width - window_size) / stride - 1e-6) + 2 if width > window_size else 1
    total_num_blocks = int(num_blocks_height * num_blocks_width)
    views = []
    for i in range(total_num_blocks):
        h_start = int((i // num_blocks_width) * stride)
        h_end = h_start + window_size
        w_start = int((i % num_blocks_width) * stride)
        w_end = w_start + window_size
        if h_end > height:
            h_start = int(h_start + height - h_end)
            h_end = int(height)
        if w_end > width:
            w_start = int(w_start + width - w_end)
            w_end = int(width)
        if h_start < 0:
            h_end = int(h_end - h_start)
            h_start = 0
        if w_start < 0:
            w_end = int(w_end - w_start)
            w_start = 0
        if random_jitter:
            jitter_range = (window_size - stride) // 4
            w_jitter = 0
            h_jitter = 0
            if (w_start != 0) and (w_end != width):
                w_jitter = random.randint(-jitter_range, jitter_range)
            elif (w_start == 0) and (w_end != width):
                w_jitter = random.randint(-jitter_range, 0)
            elif (w_start != 0) and (w_end == width):
                w_jitter = random.randint(0, jitter_range)
            if (h_start != 0) and (h_end != height):
                h_jitter = random.randint(-jitter_range, jitter_range)
            elif (h_start == 0) and (h_end != height):
                h_jitter = random.randint(-jitter_range, 0)
            elif (h_start != 0) and (h_end == height):
                h_jitter = random.randint(0, jitter_range)
            h_start += (h_jitter + jitter_range)
            h_end += (h_jitter + jitter_range)
            w_start += (w_jitter + jitter_range)
            w_end += (w_jitter + jitter_range)
        views.append((h_start, h_end, w_start, w_end))
    return views


def official_gaussian_kernel(kernel_size=3, sigma=1.0, channels=3):
    x_coord = torch.arange(kernel_size)
    gaussian_1d = torch.exp(-(x_coord - (kernel_size - 1) / 2) ** 2 / (2 * sigma ** 2))
    gaussian_1d = gaussian_1d / gaussian_1d.sum()
    gaussian_2d = gaussian_1d[:, None] * gaussian_1d[None, :]
    return gaussian_2d[None, None, :, :].repeat(channels, 1, 1, 1)


def official_gaussian_filter(latents, kernel_size=3, sigma=1.0):
    channels = latents.shape[1]
    kernel = official_gaussian_kernel(kernel_size, sigma, channels).to(latents.device, latents.dtype)
    return F.conv2d(latents, kernel, padding=kernel_size // 2, groups=channels)


def official_tiled_decode(vae_decode, latents, current_height, current_width, sample_size, vae_scale_factor):
    core_size = sample_size // 4
    core_stride = core_size
    pad_size = sample_size // 8 * 3
    decoder_view_batch_size = 1
    views = official_get_views(current_height, current_width, stride=core_stride, window_size=core_size,
                               vae_scale_factor=vae_scale_factor)
    views_batch = [views[i: i + decoder_view_batch_size] for i in range(0, len(views), decoder_view_batch_size)]
    latents_ = F.pad(latents, (pad_size, pad_size, pad_size, pad_size), "constant", 0)
    image = torch.zeros(latents.size(0), 3, current_height, current_width).to(latents.device)
    count = torch.zeros_like(image).to(latents.device)
    for j, batch_view in enumerate(views_batch):
        latents_for_view = torch.cat(
            [latents_[:, :, h_start:h_end + pad_size * 2, w_start:w_end + pad_size * 2]
             for h_start, h_end, w_start, w_end in batch_view])
        image_patch = vae_decode(latents_for_view)
        h_start, h_end, w_start, w_end = views[j]
        h_start, h_end, w_start, w_end = (h_start * vae_scale_factor, h_end * vae_scale_factor,
                                          w_start * vae_scale_factor, w_end * vae_scale_factor)
        p_h_start, p_h_end, p_w_start, p_w_end = (pad_size * vae_scale_factor,
                                                  image_patch.size(2) - pad_size * vae_scale_factor,
                                                  pad_size * vae_scale_factor,
                                                  image_patch.size(3) - pad_size * vae_scale_factor)
        image[:, :, h_start:h_end, w_start:w_end] += image_patch[:, :, p_h_start:p_h_end, p_w_start:p_w_end]
        count[:, :, h_start:h_end, w_start:w_end] += 1
    return image / count


def official_demofusion(unet, scheduler, *, height, width, sample_size, vae_scale_factor, latents,
                        prompt_embeds, negative_prompt_embeds, add_text_embeds=None, negative_add_text_embeds=None,
                        num_inference_steps, guidance_scale, view_batch_size, stride, cosine_scale_1,
                        cosine_scale_2, cosine_scale_3, sigma):
    """``DemoFusionSDXLPipeline.__call__`` from step 4, ``output_type="latent"``; SD1.5 without added cond."""
    sdxl = add_text_embeds is not None
    x1_size = sample_size * vae_scale_factor
    height_scale = height / x1_size
    width_scale = width / x1_size
    scale_num = int(max(height_scale, width_scale))
    aspect_ratio = min(height_scale, width_scale) / max(height_scale, width_scale)
    original_size = target_size = (height, width)
    do_classifier_free_guidance = guidance_scale > 1.0
    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    extra_step_kwargs = {}
    add_time_ids = torch.tensor([list(original_size + (0, 0) + target_size)], dtype=prompt_embeds.dtype)
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
        if sdxl:
            add_text_embeds = torch.cat([negative_add_text_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([add_time_ids, add_time_ids], dim=0)
    add_time_ids = add_time_ids.repeat(1, 1)

    def unet_call(latent_model_input, t, encoder_hidden_states, text_embeds=None, time_ids=None):
        kwargs = {}
        if sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet(latent_model_input, t, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                    **kwargs)[0]

    outputs = []
    for i, t in enumerate(timesteps):
        latent_model_input = latents.repeat_interleave(2, dim=0) if do_classifier_free_guidance else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet_call(latent_model_input, t, prompt_embeds, add_text_embeds, add_time_ids)
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred[::2], noise_pred[1::2]
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
    anchor_mean = latents.mean()
    anchor_std = latents.std()
    outputs.append(latents)

    for current_scale_num in range(2, scale_num + 1):
        current_height = sample_size * vae_scale_factor * current_scale_num
        current_width = sample_size * vae_scale_factor * current_scale_num
        if height > width:
            current_width = int(current_width * aspect_ratio)
        else:
            current_height = int(current_height * aspect_ratio)
        latents = F.interpolate(latents, size=(int(current_height / vae_scale_factor),
                                               int(current_width / vae_scale_factor)), mode="bicubic")
        noise_latents = []
        noise = torch.randn_like(latents)
        for timestep in timesteps:
            noise_latents.append(scheduler.add_noise(latents, noise, timestep.unsqueeze(0)))
        latents = noise_latents[0]
        for i, t in enumerate(timesteps):
            count = torch.zeros_like(latents)
            value = torch.zeros_like(latents)
            cosine_factor = 0.5 * (1 + torch.cos(torch.pi * (scheduler.config.num_train_timesteps - t)
                                                 / scheduler.config.num_train_timesteps)).cpu()
            c1 = cosine_factor ** cosine_scale_1
            latents = latents * (1 - c1) + noise_latents[i] * c1

            views = official_get_views(current_height, current_width, stride=stride, window_size=sample_size,
                                       random_jitter=True, vae_scale_factor=vae_scale_factor)
            views_batch = [views[i: i + view_batch_size] for i in range(0, len(views), view_batch_size)]
            jitter_range = (sample_size - stride) // 4
            latents_ = F.pad(latents, (jitter_range, jitter_range, jitter_range, jitter_range), "constant", 0)
            count_local = torch.zeros_like(latents_)
            value_local = torch.zeros_like(latents_)
            for j, batch_view in enumerate(views_batch):
                vb_size = len(batch_view)
                latents_for_view = torch.cat([latents_[:, :, h_start:h_end, w_start:w_end]
                                              for h_start, h_end, w_start, w_end in batch_view])
                latent_model_input = latents_for_view
                latent_model_input = (latent_model_input.repeat_interleave(2, dim=0)
                                      if do_classifier_free_guidance else latent_model_input)
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                prompt_embeds_input = torch.cat([prompt_embeds] * vb_size)
                text_embeds_input = time_ids_input = None
                if sdxl:
                    text_embeds_input = torch.cat([add_text_embeds] * vb_size)
                    time_ids_input = []
                    for h_start, h_end, w_start, w_end in batch_view:
                        add_time_ids_ = add_time_ids.clone()
                        add_time_ids_[:, 2] = h_start * vae_scale_factor
                        add_time_ids_[:, 3] = w_start * vae_scale_factor
                        time_ids_input.append(add_time_ids_)
                    time_ids_input = torch.cat(time_ids_input)
                noise_pred = unet_call(latent_model_input, t, prompt_embeds_input, text_embeds_input, time_ids_input)
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred[::2], noise_pred[1::2]
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents_denoised_batch = scheduler.step(noise_pred, t, latents_for_view, **extra_step_kwargs,
                                                        return_dict=False)[0]
                for latents_view_denoised, (h_start, h_end, w_start, w_end) in zip(
                        latents_denoised_batch.chunk(vb_size), batch_view):
                    value_local[:, :, h_start:h_end, w_start:w_end] += latents_view_denoised
                    count_local[:, :, h_start:h_end, w_start:w_end] += 1
            value_local = value_local[:, :, jitter_range: jitter_range + current_height // vae_scale_factor,
                                      jitter_range: jitter_range + current_width // vae_scale_factor]
            count_local = count_local[:, :, jitter_range: jitter_range + current_height // vae_scale_factor,
                                      jitter_range: jitter_range + current_width // vae_scale_factor]
            c2 = cosine_factor ** cosine_scale_2
            value += value_local / count_local * (1 - c2)
            count += torch.ones_like(value_local) * (1 - c2)

            views = [[h, w] for h in range(current_scale_num) for w in range(current_scale_num)]
            views_batch = [views[i: i + view_batch_size] for i in range(0, len(views), view_batch_size)]
            h_pad = (current_scale_num - (latents.size(2) % current_scale_num)) % current_scale_num
            w_pad = (current_scale_num - (latents.size(3) % current_scale_num)) % current_scale_num
            latents_ = F.pad(latents, (w_pad, 0, h_pad, 0), "constant", 0)
            count_global = torch.zeros_like(latents_)
            value_global = torch.zeros_like(latents_)
            c3 = 0.99 * cosine_factor ** cosine_scale_3 + 1e-2
            std_, mean_ = latents_.std(), latents_.mean()
            latents_gaussian = official_gaussian_filter(latents_, kernel_size=(2 * current_scale_num - 1),
                                                        sigma=sigma * c3)
            latents_gaussian = (latents_gaussian - latents_gaussian.mean()) / latents_gaussian.std() * std_ + mean_
            for j, batch_view in enumerate(views_batch):
                latents_for_view = torch.cat([latents_[:, :, h::current_scale_num, w::current_scale_num]
                                              for h, w in batch_view])
                latents_for_view_gaussian = torch.cat(
                    [latents_gaussian[:, :, h::current_scale_num, w::current_scale_num] for h, w in batch_view])
                vb_size = latents_for_view.size(0)
                latent_model_input = latents_for_view_gaussian
                latent_model_input = (latent_model_input.repeat_interleave(2, dim=0)
                                      if do_classifier_free_guidance else latent_model_input)
                latent_model_input = scheduler.scale_model_input(latent_model_input, t)
                prompt_embeds_input = torch.cat([prompt_embeds] * vb_size)
                text_embeds_input = time_ids_input = None
                if sdxl:
                    text_embeds_input = torch.cat([add_text_embeds] * vb_size)
                    time_ids_input = torch.cat([add_time_ids] * vb_size)
                noise_pred = unet_call(latent_model_input, t, prompt_embeds_input, text_embeds_input, time_ids_input)
                if do_classifier_free_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred[::2], noise_pred[1::2]
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents_denoised_batch = scheduler.step(noise_pred, t, latents_for_view, **extra_step_kwargs,
                                                        return_dict=False)[0]
                for latents_view_denoised, (h, w) in zip(latents_denoised_batch.chunk(vb_size), batch_view):
                    value_global[:, :, h::current_scale_num, w::current_scale_num] += latents_view_denoised
                    count_global[:, :, h::current_scale_num, w::current_scale_num] += 1
            c2 = cosine_factor ** cosine_scale_2
            value_global = value_global[:, :, h_pad:, w_pad:]
            value += value_global * c2
            count += torch.ones_like(value_global) * c2
            latents = torch.where(count > 0, value / count, value)
        latents = (latents - latents.mean()) / latents.std() * anchor_std + anchor_mean
        outputs.append(latents)
    return outputs


# ----------------------------------------------------------------------------- fixtures


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request):
    """A tiny float64 UNet and its conditioning: (layout, unet, window, kwargs of both samplers)."""
    layout = request.param
    unet = build_unet(layout, size="tiny", device="cpu").double()
    g = torch.Generator().manual_seed(3)
    dim = unet.config.cross_attention_dim
    cond, uncond = torch.randn(1, 7, dim, generator=g).double(), torch.randn(1, 7, dim, generator=g).double()
    extra = {}
    if layout == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"add_text_embeds": torch.randn(1, pooled, generator=g).double(),
                 "negative_add_text_embeds": torch.randn(1, pooled, generator=g).double()}
    return layout, unet, int(unet.config.sample_size), cond, uncond, extra


def ours_denoiser(unet, cond, uncond, extra, height, width):
    if not extra:
        return cfg_denoiser(unet, cond, uncond, guidance_scale=GUIDANCE)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float64)
    text = torch.cat([extra["negative_add_text_embeds"], extra["add_text_embeds"]])

    def added(stage):
        crops = getattr(stage, "crops", ())
        if not crops:
            return {"text_embeds": text, "time_ids": torch.cat([time_ids, time_ids])}
        rows = []
        for top, left in crops:
            row = time_ids.clone()
            row[:, 2], row[:, 3] = top, left
            rows.append(row)
        ids = torch.cat(rows)
        n = len(crops)
        return {"text_embeds": torch.cat([text[:1].repeat(n, 1), text[1:].repeat(n, 1)]),
                "time_ids": torch.cat([ids, ids])}

    return cfg_denoiser(unet, cond, uncond, guidance_scale=GUIDANCE, added_cond_kwargs=added)


def run_both(model, *, scale, steps, aspect=(1, 1), seed=11, **settings):
    _, unet, window, cond, uncond, extra = model
    vsf = 8
    base = window * vsf
    height, width = base * scale * aspect[0] // max(aspect), base * scale * aspect[1] // max(aspect)
    spec = DemoFusionSpec(steps=steps, **settings)
    stride = spec.stride if spec.stride is not None else window // 2
    first = phases(height, width, base, vsf)[0]
    latents = torch.randn(1, 4, *first.latent_hw, generator=torch.Generator().manual_seed(5)).double()
    torch.manual_seed(seed)
    random.seed(seed)
    with torch.no_grad():
        ref = official_demofusion(
            unet, ddim(), height=height, width=width, sample_size=window, vae_scale_factor=vsf, latents=latents,
            prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=GUIDANCE,
            view_batch_size=spec.view_batch_size, stride=stride, cosine_scale_1=spec.cosine_scale_1,
            cosine_scale_2=spec.cosine_scale_2, cosine_scale_3=spec.cosine_scale_3, sigma=spec.sigma, **extra)
    out = demofusion(ours_denoiser(unet, cond, uncond, extra, height, width), ddim(), spec, height=height,
                     width=width, base=base, latent_channels=4, latents=latents,
                     generator=torch.Generator().manual_seed(seed), jitter_seed=seed, progress=False)
    return ref, out.stage_latents


def max_diff(a, b):
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- tests


def test_one_step_equals_the_official_code(model):
    """One denoising step per phase at 2x (phase 1 and the first upscaled step)."""
    ref, ours = run_both(model, scale=2, steps=1, view_batch_size=3)
    assert len(ours) == len(ref) == 2
    for r, o in zip(ref, ours, strict=True):
        assert r.shape == o.shape
        assert max_diff(r, o) < 1e-10


def test_whole_short_run_equals_the_official_code_at_3x(model):
    """Two steps, three phases, official defaults except the stride (half the tiny window)."""
    ref, ours = run_both(model, scale=3, steps=2)
    assert [tuple(r.shape) for r in ref] == [tuple(o.shape) for o in ours]
    for r, o in zip(ref, ours, strict=True):
        assert max_diff(r, o) < 1e-10
    assert max_diff(ref[-1], torch.zeros_like(ref[-1])) > 0.1  # not a trivial agreement


def test_wide_target_and_other_settings_equal_the_official_code(model):
    """A 2:1 target (padding of the dilated lattice, aspect handling) with non-default scales."""
    window = model[2]
    ref, ours = run_both(model, scale=2, steps=2, aspect=(1, 2), view_batch_size=2, stride=window // 4 * 3,
                         cosine_scale_1=2.0, cosine_scale_2=0.5, cosine_scale_3=2.0, sigma=0.8)
    for r, o in zip(ref, ours, strict=True):
        assert r.shape == o.shape
        assert max_diff(r, o) < 1e-10


def test_multi_decoder_equals_the_official_tiled_decode():
    """Tiles of window/4 with 3/8 window of context, centre kept: the official multi-decoder."""
    from unet_surgery.generation.tiny_pipeline import tiny_vae

    vae = tiny_vae().double()
    latents = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0)).double()

    def decode(z):
        return vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]

    with torch.no_grad():
        ref = official_tiled_decode(decode, latents, 24 * 8, 40 * 8, sample_size=16, vae_scale_factor=8)
        ours = tiled_decode(lambda z: decode(z), latents, window=16, vae_scale_factor=8)
    assert ours.shape == ref.shape == (1, 3, 192, 320)
    assert ref.dtype == torch.float32  # the official accumulator: float32 rounding is the tolerance
    assert max_diff(ours.float(), ref) < 1e-6


def test_views_equal_the_official_views():
    for h, w, window, stride in [(256, 256, 128, 64), (384, 200, 128, 64), (128, 128, 128, 64), (97, 64, 64, 8)]:
        assert view_grid(h, w, window, stride) == official_get_views(h, w, window, stride, vae_scale_factor=1)


@pytest.mark.parametrize(("height", "width", "message"), [
    (512, 512, "smaller than the base"),
    (1536, 1024, "less than twice the base"),
])
def test_targets_without_an_upscaling_phase_are_refused(height, width, message):
    with pytest.raises(PatchError, match=message):
        phases(height, width, 1024, 8)


def test_each_local_view_is_conditioned_on_its_corner_as_sdxl_crop() -> None:
    """SDXL's ``time_ids`` are original size, crop corner (top, left), target size
    (``_get_add_time_ids``); DemoFusion gives each local view its top-left corner in pixels."""
    from unet_surgery.sampling.pipelines import crop_time_ids

    time_ids = torch.tensor([[2048.0, 3072.0, 0.0, 0.0, 2048.0, 3072.0]])
    got = crop_time_ids(time_ids, [(0, 512), (1024, 256)])
    assert torch.equal(got, torch.tensor([[2048.0, 3072.0, 0.0, 512.0, 2048.0, 3072.0],
                                          [2048.0, 3072.0, 1024.0, 256.0, 2048.0, 3072.0]]))
    assert torch.equal(time_ids[0, 2:4], torch.zeros(2))  # the caller's rows are left as they were
