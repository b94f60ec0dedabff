"""ControlNet, img2img and inpainting pipelines under every method, on tiny random weights.

The reference for where ControlNet residuals go is HiDiffusion's official UNet forward
(megvii-research/HiDiffusion @ e9ec39a, ``hidiffusion.py``): after the down blocks each residual
is resized bicubically to its skip and added to the skip copy; after the mid block the mid
residual is resized and added to the hidden state. The tests build that placement themselves
(hooks on the down blocks and the mid block) and compare the patch's result with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import preset_map
from tests.pipelines import tiny_pipelines as tp
from unet_surgery import apply
from unet_surgery.patching.controlnet import BLOCK_HOOKS
from unet_surgery.recipes.auto import cascade_recipe, scalecrafter_recipe
from unet_surgery.recipes.fouriscale import fouriscale_recipe
from unet_surgery.recipes.freeu import freeu_recipe
from unet_surgery.recipes.hidiffusion import hidiffusion_recipe
from unet_surgery.sampling import apply_to_pipeline

pytestmark = pytest.mark.filterwarnings("ignore")

BASE = {"sd15": 64, "sdxl": 128}  # the tiny UNets' training size in pixels
KXK = {"op": ["conv2d"], "kernel": 3, "axis": ["spatial"]}
SELF_ATTENTION = {"op": ["attention"], "kind": ["self"], "axis": ["spatial"]}


def _recipe(name: str, base: int, passes: list[dict]) -> dict:
    return {"name": name, "base_resolution": [base, base], "target_resolutions": [[2 * base, 2 * base]],
            "passes": passes}


METHODS: dict[str, Callable[[Any, int], Any]] = {
    "redilate": lambda m, b: scalecrafter_recipe(m, base=b, target=2 * b),
    "disperse": lambda m, b: _recipe("disperse", b, [
        {"type": "redilate", "select": {**KXK, "level": "1.."}, "factor": 2, "schedule": {"tau": 50}},
        {"type": "disperse", "select": {**KXK, "level": "1.."}, "schedule": {"tau": 50}}]),
    "noise_damped_cfg": lambda m, b: _recipe("ndcfg", b, [
        {"type": "redilate", "select": {**KXK, "level": "1.."}, "factor": 2, "schedule": {"tau": 50}},
        {"type": "noise_damped_cfg", "select": {**KXK, "level": "2.."}, "factor": 3, "schedule": {"tau": 50}}]),
    "scale_fusion": lambda m, b: _recipe("scale-fusion", b, [{"type": "scale_fusion", "select": SELF_ATTENTION}]),
    "self_cascade": lambda m, b: cascade_recipe(m, base=b, target=2 * b, scale_fusion=True),
    "freeu": lambda m, b: freeu_recipe(m, base=b, target=2 * b),
    "fouriscale": lambda m, b: fouriscale_recipe(m, base=b, target=2 * b),
    "hidiffusion": lambda m, b: hidiffusion_recipe(m, base=b, target=2 * b),
}


def recipe_of(method: str, pipeline: str) -> Any:
    preset = tp.PRESET_OF[pipeline]
    return METHODS[method](preset_map(preset, "tiny"), BASE[preset])


def record_controlnet(controlnet: torch.nn.Module) -> tuple[list, Any]:
    """Every ControlNet call: its inputs and the residuals it returned (the tensors themselves,
    not copies, so a change made to them afterwards shows)."""
    calls: list[tuple[tuple, dict, Any]] = []

    def hook(module, args, kwargs, output):
        calls.append((args, dict(kwargs), output))

    return calls, controlnet.register_forward_hook(hook, with_kwargs=True)


# ----------------------------------------------------------------------------- every method


# Every method on SD1.5; on SDXL HiDiffusion, whose RAU-Net takes its other form there (pooling
# between the transformers of level 1), the one method that changes feature sizes.
MATRIX = [(m, "sd_controlnet") for m in METHODS] + [("hidiffusion", "sdxl_controlnet")]


@pytest.mark.parametrize(("method", "pipeline"), MATRIX)
def test_controlnet_pipeline_runs_under_every_method_and_its_residuals_are_the_plain_controlnets(
    pipeline: str, method: str
) -> None:
    pipe, kwargs = tp.BUILDERS[pipeline]()
    recipe = recipe_of(method, pipeline)
    calls, handle = record_controlnet(pipe.controlnet)
    with apply_to_pipeline(pipe, recipe, unet_map=preset_map(tp.PRESET_OF[pipeline], "tiny")) as patch:
        assert patch.patch.plan.layers  # the method changes the UNet
        out = tp.run(pipe, kwargs)
        assert BLOCK_HOOKS in patch.patch.hooks  # the residuals went through the patch
    handle.remove()
    assert out.shape[-2:] == (2 * BASE[tp.PRESET_OF[pipeline]] // 8,) * 2 and torch.isfinite(out).all()
    assert len(calls) == tp.STEPS
    # the ControlNet is left alone: the unpatched ControlNet gives the same residuals on the same inputs
    with torch.no_grad():
        for args, kw, (down, mid) in calls:
            plain_down, plain_mid = pipe.controlnet(*args, **kw)
            assert all(torch.equal(a, b) for a, b in zip(down, plain_down, strict=True))
            assert torch.equal(mid, plain_mid)


# ----------------------------------------------------------------------------- where residuals go


def official_placement(unet: torch.nn.Module, down: list[torch.Tensor], mid: torch.Tensor) -> list:
    """Hooks that add the residuals as HiDiffusion's official forward does: each down block's
    skip copies get theirs (resized bicubically to the skip), the mid block's output its own.
    The first residual (conv_in's skip) must be zero: no down block returns that skip."""
    assert not down[0].any()
    remaining = list(down[1:])

    def resized(residual: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return F.interpolate(residual, size=tuple(feature.shape[-2:]), mode="bicubic")

    def down_hook(module, args, output):
        sample, skips = output
        take = [remaining.pop(0) for _ in skips]
        return sample, tuple(s + resized(r, s) for s, r in zip(skips, take, strict=True))

    def mid_hook(module, args, output):
        return output + resized(mid, output)

    handles = [block.register_forward_hook(down_hook) for block in unet.down_blocks]
    handles.append(unet.mid_block.register_forward_hook(mid_hook))
    return handles


def _controlnet_call(pipeline: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any], list, torch.Tensor]:
    """The tiny UNet of ``pipeline``, UNet inputs at twice its base size, and ControlNet residuals
    for them (conv_in's zeroed, see :func:`official_placement`)."""
    pipe, _ = tp.BUILDERS[pipeline]()
    unet = pipe.unet
    side = 2 * BASE[tp.PRESET_OF[pipeline]] // 8
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        "sample": torch.randn(2, 4, side, side, generator=g),
        "timestep": torch.tensor(999.0),
        "encoder_hidden_states": torch.randn(2, tp.TOKENS, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[side * 8.0, side * 8.0, 0, 0, side * 8.0, side * 8.0]] * 2)}
    with torch.no_grad():
        down, mid = pipe.controlnet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                    controlnet_cond=torch.rand(2, 3, side * 8, side * 8, generator=g),
                                    added_cond_kwargs=inputs.get("added_cond_kwargs"), return_dict=False)
    down = [torch.zeros_like(down[0]), *down[1:]]
    return unet, inputs, down, mid


def rau_net_recipe(pipeline: str) -> dict:
    """HiDiffusion's first RAU-Net pair alone (SD1.5: the level-0 downsampler; SDXL: pooling at
    level 1), switched off after 40 % of the steps as published."""
    base = BASE[tp.PRESET_OF[pipeline]]
    if pipeline.startswith("sdxl"):
        select = {**SELF_ATTENTION, "stage": ["down"], "level": 1}
    else:
        select = {"op": ["conv2d"], "stride": [2], "stage": ["down"], "level": 0}
    return _recipe("rau-net", base, [{"type": "rau_net", "select": select, "switch": 0.4}])


@pytest.mark.parametrize("pipeline", ["sd_controlnet", "sdxl_controlnet"])
def test_residuals_are_resized_to_the_rau_net_features_as_the_official_code_does(pipeline: str) -> None:
    unet, inputs, down, mid = _controlnet_call(pipeline)
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), apply(unet, rau_net_recipe(pipeline), unet_map=preset_map(tp.PRESET_OF[pipeline], "tiny")) as patch:
        patch.set_timesteps([999, 500, 1])  # step 0 of 3: RAU-Net on
        handle = unet.mid_block.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
        ours = unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        handle.remove()
        hooks = official_placement(unet, down, mid)
        reference = unet(**inputs).sample
        for h in hooks:
            h.remove()
    assert shapes[0][-2:] != tuple(mid.shape[-2:])  # RAU-Net did shrink the deep features
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("pipeline", ["sd_controlnet", "sdxl_controlnet"])
def test_residuals_outside_the_window_give_the_plain_unets_result_bit_for_bit(pipeline: str) -> None:
    unet, inputs, down, mid = _controlnet_call(pipeline, seed=1)
    down[0] = torch.randn_like(down[0])  # conv_in's skip too
    inputs = {**inputs, "timestep": torch.tensor(1.0), "down_block_additional_residuals": down,
              "mid_block_additional_residual": mid}
    with torch.no_grad():
        plain = unet(**inputs).sample
        with apply(unet, rau_net_recipe(pipeline), unet_map=preset_map(tp.PRESET_OF[pipeline], "tiny")) as patch:
            patch.set_timesteps([999, 500, 1])  # t = 1 is the last step: RAU-Net's window is closed
            ours = unet(**inputs).sample
            assert BLOCK_HOOKS in patch.hooks  # the residuals went through the patch's hooks
    assert torch.equal(ours, plain)


# ----------------------------------------------------------------------------- img2img and inpainting


@pytest.mark.parametrize("pipeline", ["sd_img2img", "sdxl_img2img", "sd_inpaint", "sdxl_inpaint"])
def test_img2img_and_inpainting_pipelines_run_under_hidiffusion(pipeline: str) -> None:
    """RAU-Net acts on step 0 (the deepest features shrink) and the run completes; re-dilation,
    noise-damped guidance and bit-exact removal are checked on these pipelines in
    test_apply_to_pipeline.py."""
    builder = tp.sdxl_inpaint if pipeline == "sdxl_inpaint" else tp.BUILDERS[pipeline]
    pipe, kwargs = builder()
    side = 2 * BASE[tp.PRESET_OF[pipeline]] // 8
    deepest: list[tuple[int, ...]] = []
    handle = pipe.unet.mid_block.register_forward_hook(lambda m, a, o: deepest.append(tuple(o.shape[-2:])))
    with apply_to_pipeline(pipe, recipe_of("hidiffusion", pipeline), unet_map=preset_map(tp.PRESET_OF[pipeline], "tiny")):
        patched = tp.run(pipe, kwargs)
    handle.remove()
    assert patched.shape[-2:] == (side, side) and torch.isfinite(patched).all()
    assert len(deepest) == tp.STEPS and deepest[0] != deepest[-1]  # shrunk on step 0, plain on the last


# ----------------------------------------------------------------------------- self-cascade


def test_self_cascade_runs_the_controlnet_at_every_stage_and_adds_only_its_residuals() -> None:
    """FreeScale's self-cascade on a ControlNet pipeline: each stage's ControlNet sees the condition
    image at that stage's size and the pipeline's end rule ((i + 1) / n <= end); at scale 0 the
    run is bit for bit the plain pipeline's cascade."""
    from diffusers import StableDiffusionPipeline

    from unet_surgery.sampling import self_cascade_sample

    pipe, kwargs = tp.sd_controlnet()
    # built first: StableDiffusionPipeline.__init__ rewrites the shared scheduler's config (clip_sample off)
    plain_pipe = StableDiffusionPipeline(**{k: v for k, v in pipe.components.items() if k != "controlnet"},
                                         requires_safety_checker=False)
    recipe = recipe_of("self_cascade", "sd_controlnet")
    embeds = {k: kwargs[k] for k in ("prompt_embeds", "negative_prompt_embeds")}
    common = {**embeds, "guidance_scale": 5.0, "num_inference_steps": tp.STEPS, "progress": False,
              "unet_map": preset_map("sd15", "tiny")}
    scales: list[float] = []
    sizes: list[tuple[int, ...]] = []

    def hook(module, args, kw):
        scales.append(float(kw["conditioning_scale"]))
        sizes.append(tuple(kw["controlnet_cond"].shape))

    handle = pipe.controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    controlled = self_cascade_sample(pipe, recipe, image=kwargs["image"], control_guidance_end=0.6,
                                     generator=torch.Generator().manual_seed(0), **common).latents
    muted = self_cascade_sample(pipe, recipe, image=kwargs["image"], controlnet_conditioning_scale=0.0,
                                generator=torch.Generator().manual_seed(0), **common).latents
    handle.remove()
    plain = self_cascade_sample(plain_pipe, recipe, generator=torch.Generator().manual_seed(0), **common).latents
    stages = [tuple(s) for s in recipe.sampling.stages]
    assert stages == [(64, 64), (128, 128)]
    first = tp.STEPS  # stage 1 runs every step; stage 2 from its restart step
    per_run = len(sizes) // 2  # two cascades recorded, the same number of calls each
    later = per_run - first
    assert 0 < later <= tp.STEPS
    assert sizes[:per_run] == [(2, 3, 64, 64)] * first + [(2, 3, 128, 128)] * later
    expected = [1.0 if (i + 1) / tp.STEPS <= 0.6 else 0.0 for i in range(tp.STEPS)]
    assert scales[:per_run] == expected + expected[tp.STEPS - later:]
    assert scales[per_run:] == [0.0] * per_run
    assert torch.equal(muted, plain)
    assert not torch.allclose(controlled, plain, atol=1e-3)
