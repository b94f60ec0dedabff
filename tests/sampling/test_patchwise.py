"""Patch-wise denoising equals a literal transcription of MultiDiffusion's loop; bad settings refused.

Oracle: omerbt/MultiDiffusion ``panorama.py`` (``text2panorama``): per step, every view is
denoised with classifier-free guidance and stepped by the scheduler, the stepped views are summed
into ``value`` and counted into ``count``, and the latent becomes ``where(count > 0, value /
count, value)``; views from DemoFusion's ``get_views`` (the last row and column snapped to the
border), transcribed in ``tests/sampling/test_demofusion.py``. We average model outputs and step
once: equal for DDIM up to float64 rounding, hence 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from tests.sampling.test_demofusion import official_get_views
from unet_surgery.presets import build_unet
from unet_surgery.recipes.schema import SamplingSpec
from unet_surgery.sampling.cascade import cfg_denoiser, self_cascade
from unet_surgery.sampling.patchwise import PatchError, ViewStage, patchwise_denoiser, view_grid

pytestmark = pytest.mark.filterwarnings("ignore")
W = 4.0


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(scope="module")
def parts():
    unet = build_unet("sd15", size="tiny", device="cpu").double()
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 7, 32, generator=g).double(), torch.randn(1, 7, 32, generator=g).double()
    return unet, cond, uncond


def multidiffusion_literal(unet, cond, uncond, latent, steps, window, stride):
    """``text2panorama``'s loop with the snapped views, transcribed."""
    scheduler = ddim()
    scheduler.set_timesteps(steps)
    views = official_get_views(latent.shape[-2], latent.shape[-1], window, stride, vae_scale_factor=1)
    text_embeds = torch.cat([uncond, cond])
    count = torch.zeros_like(latent)
    value = torch.zeros_like(latent)
    for t in scheduler.timesteps:
        count.zero_()
        value.zero_()
        for h_start, h_end, w_start, w_end in views:
            latent_view = latent[:, :, h_start:h_end, w_start:w_end]
            latent_model_input = torch.cat([latent_view] * 2)
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeds)["sample"]
            noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + W * (noise_pred_cond - noise_pred_uncond)
            latents_view_denoised = scheduler.step(noise_pred, t, latent_view)["prev_sample"]
            value[:, :, h_start:h_end, w_start:w_end] += latents_view_denoised
            count[:, :, h_start:h_end, w_start:w_end] += 1
        latent = torch.where(count > 0, value / count, value)
    return latent


@pytest.mark.parametrize(("hw", "window", "stride", "batch"), [((12, 16), 8, 4, 1), ((13, 20), 8, 5, 3)])
def test_patchwise_equals_the_multidiffusion_loop(parts, hw, window, stride, batch):
    unet, cond, uncond = parts
    latent = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        ref = multidiffusion_literal(unet, cond, uncond, latent, 2, window, stride)
        denoise = patchwise_denoiser(cfg_denoiser(unet, cond, uncond, guidance_scale=W), window=window,
                                     stride=stride, view_batch_size=batch)
        ours = self_cascade(denoise, ddim(), SamplingSpec(stages=(hw,), steps=2), latent_channels=4,
                            latents=latent, progress=False).latents
    assert float((ours - ref).abs().max()) < 1e-10
    # and it is not the whole-latent result: the views were really denoised apart
    with torch.no_grad():
        whole = self_cascade(cfg_denoiser(unet, cond, uncond, guidance_scale=W), ddim(),
                             SamplingSpec(stages=(hw,), steps=2), latent_channels=4, latents=latent,
                             progress=False).latents
    assert float((whole - ref).abs().max()) > 1e-3


def test_a_window_the_size_of_the_latent_is_the_plain_denoiser_bit_for_bit(parts):
    unet, cond, uncond = parts
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    plain = cfg_denoiser(unet, cond, uncond, guidance_scale=W)
    stage = ViewStage(0, 64, 64, (8, 8), 0)
    with torch.no_grad():
        assert torch.equal(patchwise_denoiser(plain, window=8, stride=4)(x, torch.tensor(500), stage),
                           plain(x, torch.tensor(500), stage))


def test_pixel_space_toy_denoiser_through_the_cascade():
    """A pixel model (3 channels, no VAE), as the toys are: a pointwise denoiser gives the same
    result patch-wise as whole, to rounding, through a two-stage self-cascade."""
    weight = torch.tensor([0.9, -0.3, 0.5], dtype=torch.float64)[None, :, None, None]

    def toy(x, t, stage):
        return x * weight + 0.01 * float(t) / 1000

    spec = SamplingSpec(stages=((16, 16), (32, 48)), steps=4, restart_step=1)
    kwargs = {"latent_channels": 3, "batch_size": 2, "latents": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).double(),
              "progress": False}
    whole = self_cascade(toy, ddim(), spec, generator=torch.Generator().manual_seed(1), **kwargs).latents
    views = self_cascade(patchwise_denoiser(toy, window=16, stride=8), ddim(), spec,
                         generator=torch.Generator().manual_seed(1), **kwargs).latents
    assert whole.shape == views.shape == (2, 3, 32, 48)
    assert float((whole - views).abs().max()) < 1e-12


def test_views_cover_the_latent_and_the_last_ones_touch_the_border():
    views = view_grid(20, 37, 8, 6)
    covered = torch.zeros(20, 37)
    for h0, h1, w0, w1 in views:
        assert (h1 - h0, w1 - w0) == (8, 8)
        covered[h0:h1, w0:w1] += 1
    assert bool((covered > 0).all())
    assert max(v[1] for v in views) == 20 and max(v[3] for v in views) == 37


@pytest.mark.parametrize(("hw", "window", "stride", "message"), [
    ((8, 16), 12, 4, r"patches.window: 12 is larger than the 8x16 latent"),
    ((16, 16), 8, 0, r"patches.stride: must be a positive"),
    ((16, 16), 8, 9, r"patches.stride: 9 is larger than the window 8"),
])
def test_bad_windows_and_strides_are_one_clear_line(hw, window, stride, message):
    denoise = patchwise_denoiser(lambda x, t, s: x, window=window, stride=stride)
    with pytest.raises(PatchError, match=message) as info:
        denoise(torch.zeros(1, 4, *hw), torch.tensor(1), ViewStage(0, 8 * hw[0], 8 * hw[1], hw, 0))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("patches", "expected"), [
    ({}, (64, 32)),  # the native size in latents (the smaller side of 512x768 px / 8), half of it
    ({"window": 48}, (48, 24)),
    ({"window": 48, "stride": 40}, (48, 40)),
])
def test_the_default_window_is_the_base_size_and_the_default_stride_half_of_it(patches, expected):
    """MultiDiffusion's and DemoFusion's settings: views of the native size, half a view apart."""
    from unet_surgery.recipes import parse_recipe
    from unet_surgery.sampling.patchwise import patch_settings

    recipe = parse_recipe({"name": "p", "base_resolution": [512, 768], "target_resolutions": [[1024, 1536]],
                           "passes": [], "patches": patches})
    assert patch_settings(recipe) == expected
