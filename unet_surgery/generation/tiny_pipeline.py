"""Tiny SD1.5 / SDXL pipeline folders with random weights, to try ``generate`` without downloads.

A real ``save_pretrained`` folder (safetensors, ``model_index.json``, a CLIP tokenizer and text
encoder(s)) around the tiny test UNets of :mod:`unet_surgery.presets` (built for 8x8 latents:
64x64 px for SD1.5, 16x16 latents, 128x128 px, for SDXL). Nothing is downloaded: the tokenizer's
vocabulary is the 256 byte symbols of CLIP's byte-level BPE and no merges, so every prompt
tokenizes. Zero-initialised output layers are randomised so the images are not flat.

``python -m unet_surgery.generation.tiny_pipeline OUT --layout sd15|sdxl`` writes one, and with
``--controlnet`` a random ControlNet for it (to try ``generate --controlnet``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from unet_surgery.presets import build_unet, preset_config, randomize_zero_init_

LAYOUTS = ("sd15", "sdxl")
TOKENS = 77  # CLIP's context length; the pipelines pad every prompt to it


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer() -> Any:
    """A CLIP tokenizer over single bytes (514 tokens): any text, no merges, no files needed."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in _byte_symbols():
            vocab[symbol + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TOKENS)


def tiny_text_encoder(hidden: int, *, projection_dim: int | None = None, seed: int = 0) -> Any:
    """A one-layer CLIP text encoder (with a projection head when ``projection_dim`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=projection_dim or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_vae(seed: int = 0) -> Any:
    """An 8x-downsampling VAE (four blocks, 8 channels): cheap, but a real encode/decode."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, force_upcast=False,
        sample_size=8 * int(preset_config("sd15", size="tiny")["sample_size"]),
    ).eval()


def _scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_pipeline(layout: str, seed: int = 0) -> Any:
    """A tiny random-weight ``StableDiffusionPipeline`` (``sd15``) or ``StableDiffusionXLPipeline``."""
    import diffusers

    from unet_surgery.generation.pipeline_loader import quiet_third_party

    quiet_third_party()

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unet = build_unet(layout, size="tiny", device="cpu")
    with torch.no_grad():
        randomize_zero_init_(unet, seed)
    unet.eval()
    if layout == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=tiny_vae(seed), text_encoder=tiny_text_encoder(32, seed=seed), tokenizer=tiny_tokenizer(),
            unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    cfg = preset_config("sdxl", size="tiny")
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    first = cfg["cross_attention_dim"] - pooled  # the UNet reads both encoders' states side by side
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(first, seed=seed),
        text_encoder_2=tiny_text_encoder(pooled, projection_dim=pooled, seed=seed + 1),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=_scheduler(),
    )


def save_tiny_pipeline(folder: str | Path, layout: str = "sd15", seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` as a diffusers folder (safetensors) and return its path."""
    path = Path(folder)
    tiny_pipeline(layout, seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_controlnet(layout: str = "sd15", seed: int = 0) -> Any:
    """A random-weight ``ControlNetModel`` for :func:`tiny_pipeline`'s UNet of ``layout``."""
    import diffusers

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    unet = build_unet(layout, size="tiny", device="cpu")
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():
        randomize_zero_init_(controlnet, seed + 100)  # zero output convs would give zero residuals
    return controlnet.eval()


def save_tiny_controlnet(folder: str | Path, layout: str = "sd15", seed: int = 0) -> Path:
    """Write :func:`tiny_controlnet` as a diffusers folder (safetensors) and return its path."""
    path = Path(folder)
    tiny_controlnet(layout, seed).save_pretrained(path, safe_serialization=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unet_surgery.generation.tiny_pipeline",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", metavar="OUT", help="folder to write")
    parser.add_argument("--layout", choices=LAYOUTS, default="sd15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--controlnet", action="store_true",
                        help="write a ControlNet for the layout's tiny UNet instead of a pipeline")
    args = parser.parse_args(argv)
    save = save_tiny_controlnet if args.controlnet else save_tiny_pipeline
    print(save(args.out, args.layout, args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
