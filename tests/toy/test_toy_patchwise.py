"""The toys run patch-wise recipes: MultiDiffusion's views and DemoFusion through ``sample_recipe``.

Oracle for the patches section: the local-patch loop of DemoFusion's official pipeline
(PRIS-CV/DemoFusion, without jitter), transcribed: per step, every view of
``official_get_views`` is denoised with classifier-free guidance, the guided outputs are summed
into ``value`` and counted into ``count``, and the whole image takes one scheduler step with
``value / count``. The toy's own DDIM (``make_ddim_scheduler``) is the sampler in both.
"""

from __future__ import annotations

import pytest
import torch

from tests.sampling.test_demofusion import official_get_views
from unet_surgery.recipes.auto import auto_recipe
from unet_surgery.toy.model import load_toy, make_ddim_scheduler
from unet_surgery.toy.sampling import initial_noise, sample_recipe

pytestmark = pytest.mark.filterwarnings("ignore")
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def toy():
    return load_toy("toy-eps")


def views_literal(toy, label, seed, height, width, steps):
    scheduler = make_ddim_scheduler(toy.scheduler_config)
    scheduler.set_timesteps(steps)
    x = initial_noise([seed], height, width)
    cond = toy.encode(torch.tensor([label]))
    uncond = toy.encode(torch.tensor([toy.empty_class]))
    views = official_get_views(height, width, window_size=32, stride=16, vae_scale_factor=1)
    for t in scheduler.timesteps:
        value = torch.zeros_like(x)
        count = torch.zeros_like(x)
        for h0, h1, w0, w1 in views:
            view = x[:, :, h0:h1, w0:w1]
            out = toy.unet(torch.cat([view, view]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            out_uncond, out_cond = out.chunk(2)
            value[:, :, h0:h1, w0:w1] += out_uncond + GUIDANCE * (out_cond - out_uncond)
            count[:, :, h0:h1, w0:w1] += 1
        x = scheduler.step(value / count, t, x).prev_sample
    return x.clamp(-1, 1)


@torch.no_grad()
def test_multidiffusion_recipe_on_the_toy_equals_the_view_loop(toy):
    height, width = 32, 64  # two views apart and one straddling them
    recipe = auto_recipe(None, base=32, target=(height, width), vae_scale_factor=1, policy="multidiffusion")  # type: ignore[arg-type]
    ours = sample_recipe(toy, recipe, [1], seeds=[77], size=(height, width), steps=3, guidance_scale=GUIDANCE)
    ref = views_literal(toy, 1, 77, height, width, 3)
    assert ours.shape == (1, 3, height, width)
    # float32 through 3 steps of a toy UNet; the order of the view sums is the same
    assert float((ours - ref).abs().max()) < 1e-4
    whole = sample_recipe(toy, None, [1], seeds=[77], size=(height, width), steps=3, guidance_scale=GUIDANCE)
    assert float((whole - ref).abs().max()) > 1e-2  # the views were really denoised apart


@torch.no_grad()
def test_demofusion_on_the_toy_is_one_run_per_seed(toy):
    """Each image is its seed's own DemoFusion run (DemoFusion re-normalises with the whole
    batch's statistics, so batching seeds would couple them): a batch of two equals the two runs
    alone, and the two images differ."""
    recipe = auto_recipe(None, base=32, target=64, vae_scale_factor=1, policy="demofusion")  # type: ignore[arg-type]
    both = sample_recipe(toy, recipe, [0, 2], seeds=[5, 6], size=64, steps=2, guidance_scale=GUIDANCE)
    alone = torch.cat([sample_recipe(toy, recipe, [label], seeds=[seed], size=64, steps=2, guidance_scale=GUIDANCE)
                       for label, seed in ((0, 5), (2, 6))])
    assert both.shape == (2, 3, 64, 64)
    assert torch.equal(both, alone)
    assert float((both[0] - both[1]).abs().max()) > 0.1
