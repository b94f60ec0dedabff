"""Tiny diffusers pipelines with random weights, for end-to-end tests without downloads.

Each builder returns ``(pipe, kwargs)``: ``pipe(**kwargs, generator=...)`` runs the whole
pipeline at twice the tiny base size (the tiny UNets are built for 64x64 pixels, 8x8
latents; SVD for 64x128) with 3 steps and classifier-free guidance, and returns latents.
No text encoder exists, so prompt embeddings are passed directly (``text_encoder=None``);
SVD gets a tiny CLIP vision tower because its pipeline always encodes the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from unet_surgery.presets import build_unet, preset_config

STEPS = 3
TOKENS = 7  # prompt length; the pipelines accept any length when embeddings are given


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def tiny_vae(latent_channels: int = 4, *, temporal: bool = False, seed: int = 0) -> torch.nn.Module:
    """An 8x-downsampling VAE (four blocks) with narrow layers: cheap, but a real encode/decode."""
    import diffusers

    torch.manual_seed(seed)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
    )
    if temporal:  # its blocks hard-code 32 norm groups
        vae = diffusers.AutoencoderKLTemporalDecoder(**{**common, "block_out_channels": (32,) * 4})
    else:
        vae = diffusers.AutoencoderKL(
            **common, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, force_upcast=False
        )
    return vae.eval()


def _embeds(batch: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, TOKENS, dim, generator=_seeded(seed))


def _ddim() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _sd_embeds(dim: int) -> dict[str, Any]:
    return {"prompt_embeds": _embeds(1, dim, 1), "negative_prompt_embeds": _embeds(1, dim, 2)}


def _sdxl_embeds() -> dict[str, Any]:
    cfg = preset_config("sdxl", size="tiny")
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {
        **_sd_embeds(cfg["cross_attention_dim"]),
        "pooled_prompt_embeds": torch.randn(1, pooled, generator=_seeded(3)),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=_seeded(4)),
    }


COMMON = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "output_type": "latent"}


def sd(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=build_unet("sd15", size="tiny", device="cpu"),
        scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, {**COMMON, **_sd_embeds(32), "height": size, "width": size}


def sd_img2img(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=build_unet("sd15", size="tiny", device="cpu"),
        scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # strength 1.0 keeps all STEPS steps (the default 0.8 would drop one of three)
    return pipe, {**COMMON, **_sd_embeds(32), "image": _image(size, size, 5), "strength": 1.0}


def sdxl(size: int = 256) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=build_unet("sdxl", size="tiny", device="cpu"), scheduler=_ddim(),
    )
    return pipe, {**COMMON, **_sdxl_embeds(), "height": size, "width": size}


def sdxl_img2img(size: int = 256) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=build_unet("sdxl", size="tiny", device="cpu"), scheduler=_ddim(),
        requires_aesthetics_score=False,
    )
    return pipe, {**COMMON, **_sdxl_embeds(), "image": _image(size, size, 6), "strength": 1.0}


def _mask(height: int, width: int) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2:] = 255
    return Image.fromarray(mask)


def sd_inpaint(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=build_unet("sd15", size="tiny", device="cpu"),
        scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, {**COMMON, **_sd_embeds(32), "image": _image(size, size, 12), "mask_image": _mask(size, size),
                  "height": size, "width": size, "strength": 1.0}


def sdxl_inpaint(size: int = 256) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=build_unet("sdxl", size="tiny", device="cpu"), scheduler=_ddim(), requires_aesthetics_score=False,
    )
    return pipe, {**COMMON, **_sdxl_embeds(), "image": _image(size, size, 13), "mask_image": _mask(size, size),
                  "height": size, "width": size, "strength": 1.0}


def tiny_controlnet(unet: torch.nn.Module) -> Any:
    """A ControlNet copied from the tiny UNet's encoder, with small conditioning channels."""
    from diffusers import ControlNetModel

    torch.manual_seed(7)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():  # zero-initialised output convs would make the residuals vanish
        for p in controlnet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return controlnet.eval()


def sd_controlnet(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionControlNetPipeline

    unet = build_unet("sd15", size="tiny", device="cpu")
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=tiny_controlnet(unet),
        scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, {**COMMON, **_sd_embeds(32), "image": _image(size, size, 8), "height": size, "width": size}


def sdxl_controlnet(size: int = 256) -> tuple[Any, dict[str, Any]]:
    from diffusers import StableDiffusionXLControlNetPipeline

    unet = build_unet("sdxl", size="tiny", device="cpu")
    pipe = StableDiffusionXLControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, controlnet=tiny_controlnet(unet), scheduler=_ddim(),
    )
    return pipe, {**COMMON, **_sdxl_embeds(), "image": _image(size, size, 9), "height": size, "width": size}


def animatediff(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=build_unet("animatediff", size="tiny", device="cpu"),
        motion_adapter=None, scheduler=_ddim(),
    )
    return pipe, {**COMMON, **_sd_embeds(32), "height": size, "width": size, "num_frames": 3}


def text_to_video(size: int = 128) -> tuple[Any, dict[str, Any]]:
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None,
        unet=build_unet("modelscope_t2v", size="tiny", device="cpu"), scheduler=_ddim(),
    )
    return pipe, {**COMMON, **_sd_embeds(64), "height": size, "width": size, "num_frames": 3}


def svd(height: int = 128, width: int = 256) -> tuple[Any, dict[str, Any]]:
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(11)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=preset_config("svd", size="tiny")["cross_attention_dim"],
    )).eval()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        timestep_type="continuous", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
        interpolation_type="linear", steps_offset=1,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=tiny_vae(temporal=True), image_encoder=encoder, unet=build_unet("svd", size="tiny", device="cpu"),
        scheduler=scheduler, feature_extractor=CLIPImageProcessor(),
    )
    kwargs = {
        "image": _image(height, width, 10), "height": height, "width": width, "num_frames": 3,
        "num_inference_steps": STEPS, "min_guidance_scale": 1.0, "max_guidance_scale": 3.0,
        "output_type": "latent", "decode_chunk_size": 3,
    }
    return pipe, kwargs


BUILDERS: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
    "sd": sd,
    "sd_img2img": sd_img2img,
    "sdxl": sdxl,
    "sdxl_img2img": sdxl_img2img,
    "sd_inpaint": sd_inpaint,
    "sd_controlnet": sd_controlnet,
    "sdxl_controlnet": sdxl_controlnet,
    "animatediff": animatediff,
    "text_to_video": text_to_video,
    "svd": svd,
}
# The UNet preset each pipeline carries (for cached maps).
PRESET_OF: dict[str, str] = {
    "sd": "sd15", "sd_img2img": "sd15", "sd_inpaint": "sd15", "sd_controlnet": "sd15",
    "sdxl": "sdxl", "sdxl_img2img": "sdxl", "sdxl_inpaint": "sdxl", "sdxl_controlnet": "sdxl",
    "animatediff": "animatediff", "text_to_video": "modelscope_t2v", "svd": "svd",
}


def output_of(result: Any) -> torch.Tensor:
    """The latents a pipeline returned (images, frames: whichever the output carries)."""
    for name in ("images", "frames"):
        value = getattr(result, name, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    raise TypeError(f"no latents in {type(result).__name__}")


def run(pipe: Any, kwargs: dict[str, Any], seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return output_of(pipe(**kwargs, generator=_seeded(seed)))
