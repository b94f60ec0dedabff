"""apply_to_pipeline on every supported diffusers pipeline, end to end on tiny random weights.

Each pipeline runs at twice its tiny base size with 3 steps and CFG: before the patch, patched,
and after removal. Removal must give the pre-patch latents bit for bit; the patched run must
differ. Noise-damped guidance must be on exactly while the recipe's window is open and the
pipeline batches [uncond, cond] (conv_in then sees 3 rows instead of 2).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import preset_map
from tests.pipelines import tiny_pipelines as tp
from unet_surgery import SurgeryError, apply, current_patch
from unet_surgery.sampling import SUPPORTED_PIPELINES, PipelinePatch, apply_to_pipeline

pytestmark = pytest.mark.filterwarnings("ignore")

BASE = {"sdxl": (128, 128), "svd": (64, 128)}  # tiny base sizes in pixels; others 64x64
# SVD states its pipeline's default size, 576x1024, whatever its config: the tiny SVD recipe is forced.
FORCE = {"svd"}


def recipe_for(name: str, factor: float = 2, damped: bool = True) -> dict:
    """Spatial re-dilation (+ noise-damped guidance for the first third of the steps)."""
    base = BASE.get(tp.PRESET_OF[name], (64, 64))
    select = {"op": ["conv2d"], "kernel": 3, "axis": ["spatial"]}
    passes = [
        {"type": "redilate", "select": {**select, "level": "1.."}, "factor": factor, "schedule": {"tau": 30}},
    ]
    if damped:
        passes.append({"type": "noise_damped_cfg", "select": {**select, "level": "2.."}, "factor": 3,
                       "schedule": {"tau": 20}})
    return {"name": f"test-{name}", "base_resolution": list(base),
            "target_resolutions": [[2 * base[0], 2 * base[1]]], "passes": passes}


def conv_in_batches(pipe) -> tuple[list[int], object]:
    """Rows seen by conv_in per UNet call (3 per guided row pair under noise-damped guidance)."""
    rows: list[int] = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(int(a[0].shape[0])))
    return rows, handle


@pytest.mark.parametrize("name", list(tp.BUILDERS))
def test_patched_run_differs_and_removal_restores_bit_for_bit(name: str) -> None:
    pipe, kwargs = tp.BUILDERS[name]()
    before = tp.run(pipe, kwargs)
    scheduler = pipe.scheduler
    patch = apply_to_pipeline(pipe, recipe_for(name), unet_map=preset_map(tp.PRESET_OF[name], "tiny"),
                              force=name in FORCE)
    assert isinstance(patch, PipelinePatch) and current_patch(pipe.unet) is patch.patch
    rows, handle = conv_in_batches(pipe)
    patched = tp.run(pipe, kwargs)
    handle.remove()
    # the patch saw the sampler's own timesteps (SVD's are continuous log-sigmas)
    assert patch.patch.tracker.timesteps == [float(t) for t in scheduler.timesteps]
    # window tau 20 of 50 steps = the first 1.2 of 3 steps: damped at steps 0 and 1, then plain
    # CFG. Video UNets fold frames into conv_in's batch: k rows per sample.
    k = rows[-1] // 2
    assert rows == [3 * k, 3 * k, 2 * k], rows
    patch.remove()
    after = tp.run(pipe, kwargs)
    assert torch.equal(after, before)
    assert patched.shape == before.shape and torch.isfinite(patched).all()
    assert not torch.allclose(patched, before, atol=1e-3)
    assert "set_timesteps" not in vars(scheduler) and current_patch(pipe.unet) is None
    patch.remove()  # twice is a no-op


@pytest.mark.parametrize(
    ("name", "recipe"),
    [("animatediff", "video-animatediff-1024x1024"), ("text_to_video", "video-modelscope-512x512"),
     ("svd", "video-svd-2048x1152")],
)
def test_shipped_video_recipes_run_on_their_pipelines(name: str, recipe: str) -> None:
    pipe, kwargs = tp.BUILDERS[name]()
    before = tp.run(pipe, kwargs)
    # the shipped recipes on the tiny variants (64x64 and less) as scaled-down proxies: forced
    with apply_to_pipeline(pipe, recipe, unet_map=preset_map(tp.PRESET_OF[name], "tiny"), force=True) as patch:
        convs = patch.patch.plan.paths("convs")
        assert convs  # spatial 3x3 convs only: temporal convs are Conv3d (5-D weights), untouched
        assert all(pipe.unet.get_submodule(path).weight.dim() == 4 for path in convs)
        patched = tp.run(pipe, kwargs)
    assert not torch.allclose(patched, before, atol=1e-3)
    assert torch.equal(tp.run(pipe, kwargs), before)


def test_no_guidance_means_no_noise_damped_batch() -> None:
    """guidance_scale 1: the pipeline batches [cond] only; a 2-prompt batch must not be split."""
    pipe, kwargs = tp.sd()
    kwargs = {**kwargs, "guidance_scale": 1.0, "negative_prompt_embeds": None,
              "prompt_embeds": kwargs["prompt_embeds"].repeat(2, 1, 1)}
    with apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny")):
        rows, handle = conv_in_batches(pipe)
        out = tp.run(pipe, kwargs)
        handle.remove()
    assert rows == [2, 2, 2] and out.shape[0] == 2
    # and a guided call right after switches it back on
    pipe, kwargs = tp.sd()
    with apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny")):
        tp.run(pipe, {**kwargs, "guidance_scale": 1.0, "negative_prompt_embeds": None})
        rows, handle = conv_in_batches(pipe)
        tp.run(pipe, kwargs)
        handle.remove()
    assert rows == [3, 3, 2]


@pytest.mark.parametrize("factor", [2, 1.5])
def test_controlnet_residuals_fit_the_redilated_unet(factor: float) -> None:
    """Re-dilation keeps every feature shape, so ControlNet residuals add without any change."""
    pipe, kwargs = tp.sd_controlnet()
    residual_shapes: list[list[tuple[int, ...]]] = []
    feature_shapes: list[list[tuple[int, ...]]] = []

    def record_residuals(module, args, kw):
        residual_shapes.append([tuple(r.shape) for r in kw["down_block_additional_residuals"]]
                               + [tuple(kw["mid_block_additional_residual"].shape)])

    def record_features(module, args, out):
        feature_shapes[-1].append(tuple(out.shape if isinstance(out, torch.Tensor) else out[0].shape))

    unet = pipe.unet
    hooks = [unet.register_forward_pre_hook(record_residuals, with_kwargs=True),
             unet.register_forward_pre_hook(lambda m, a: feature_shapes.append([]))]
    # the features the residuals are added to: conv_in, every resnet / downsampler output, mid block
    hooks.append(unet.conv_in.register_forward_hook(record_features))
    for block in unet.down_blocks:
        for sub in [*block.resnets, *(block.downsamplers or [])]:
            hooks.append(sub.register_forward_hook(record_features))
    hooks.append(unet.mid_block.register_forward_hook(record_features))
    with apply_to_pipeline(pipe, recipe_for("sd_controlnet", factor, damped=False), unet_map=preset_map("sd15", "tiny")) as p:
        assert any(e.factor == factor for e in p.patch.plan.entries("redilate").values())
        tp.run(pipe, kwargs)
    for h in hooks:
        h.remove()
    assert len(residual_shapes) == 3
    for residuals, features in zip(residual_shapes, feature_shapes, strict=True):
        # hooks fire in execution order: conv_in, each resnet / downsampler, the mid block
        assert residuals == features


def test_noise_damped_guidance_expands_controlnet_residual_lists() -> None:
    """ControlNet's residual list must be expanded to [u, u, c] like every other input."""
    pipe, kwargs = tp.sd_controlnet()
    with apply_to_pipeline(pipe, recipe_for("sd_controlnet"), unet_map=preset_map("sd15", "tiny")):
        rows, handle = conv_in_batches(pipe)
        out = tp.run(pipe, kwargs)
        handle.remove()
    assert rows == [3, 3, 2] and torch.isfinite(out).all()


def test_unsupported_pipeline_is_refused_by_name() -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

    unet = tp.build_unet("sd15", size="tiny", device="cpu")
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(SurgeryError, match="DDPMPipeline is not supported") as info:
        apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny"))
    for supported in SUPPORTED_PIPELINES:
        assert supported in str(info.value)
    assert current_patch(unet) is None and "set_timesteps" not in vars(pipe.scheduler)

    class Custom(StableDiffusionPipeline):  # a subclass may batch differently: refused too
        pass

    sd, _ = tp.sd()
    custom = Custom(**sd.components, requires_safety_checker=False)
    with pytest.raises(SurgeryError, match="Custom is not supported"):
        apply_to_pipeline(custom, recipe_for("sd"))


def test_already_patched_unet_leaves_the_pipeline_untouched() -> None:
    pipe, _ = tp.sd()
    first = apply(pipe.unet, recipe_for("sd"), unet_map=preset_map("sd15", "tiny"))
    with pytest.raises(SurgeryError, match="already patched"):
        apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny"))
    assert "set_timesteps" not in vars(pipe.scheduler) and "encode_prompt" not in vars(pipe)
    first.remove()


def test_replacing_the_scheduler_after_apply_is_an_error() -> None:
    from diffusers import EulerDiscreteScheduler

    pipe, kwargs = tp.sd()
    with apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny")):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with pytest.raises(SurgeryError, match="scheduler was replaced"):
            tp.run(pipe, kwargs)


def test_timesteps_reach_the_patch_for_a_karras_scheduler() -> None:
    """Non-uniform schedules: the step index comes from the forwarded list, not from t / T."""
    from diffusers import DPMSolverMultistepScheduler

    pipe, kwargs = tp.sd()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with apply_to_pipeline(pipe, recipe_for("sd", damped=False), unet_map=preset_map("sd15", "tiny")) as p:
        steps: list[int] = []
        handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: steps.append(p.patch.tracker.current.step))
        tp.run(pipe, {**kwargs, "num_inference_steps": 4})
        handle.remove()
    assert steps == [0, 1, 2, 3]


def _unet_rows_after(pipe) -> int:
    """Rows conv_in sees when the UNet gets a guided [uncond, cond] batch of 2 at the first step."""
    rows, handle = conv_in_batches(pipe)
    x = torch.randn(2, 4, 16, 16)
    t = pipe.scheduler.timesteps[0]
    pipe.unet(x, t, encoder_hidden_states=torch.randn(2, 5, 32))
    handle.remove()
    return rows[0]


def test_unknown_guidance_warns_and_keeps_noise_damped_guidance_off() -> None:
    """No encoder call and no do_classifier_free_guidance property: a warning, guidance off."""
    pipe, _ = tp.sd()
    with apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny")) as patch:
        # a fresh pipeline has no _guidance_scale yet, so its do_classifier_free_guidance fails
        with pytest.warns(UserWarning, match="did not say whether it uses classifier-free guidance"):
            pipe.scheduler.set_timesteps(3)
        assert _unet_rows_after(pipe) == 2
        patch.patch.enable_noise_damped_cfg()  # the observation can see the other case
        assert _unet_rows_after(pipe) == 3


def test_encoder_call_without_the_guidance_flag_warns_and_keeps_guidance_off() -> None:
    pipe, kwargs = tp.sd()
    with apply_to_pipeline(pipe, recipe_for("sd"), unet_map=preset_map("sd15", "tiny")) as patch:
        with pytest.warns(UserWarning, match="called without do_classifier_free_guidance"):
            pipe.encode_prompt(None, "cpu", 1, None, prompt_embeds=kwargs["prompt_embeds"])
        pipe.scheduler.set_timesteps(3)
        assert patch.cfg is False and _unet_rows_after(pipe) == 2
        pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=kwargs["prompt_embeds"],
                           negative_prompt_embeds=kwargs["negative_prompt_embeds"])
        pipe.scheduler.set_timesteps(3)
        assert patch.cfg is True and _unet_rows_after(pipe) == 3
