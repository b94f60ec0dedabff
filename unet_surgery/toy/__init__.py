"""Small class-conditional pixel diffusion models, trained here, to test UNet surgery on a CPU.

No pretrained Stable Diffusion weights are available offline, so the project ships two models of
32x32 RGB images of one filled shape: diffusers ``UNet2DConditionModel``s with cross-attention on
a class token (``toy``: three levels, the design model; ``toy4``: four levels, the check model),
DDIM sampling with classifier-free guidance, and a metric that counts objects (touching copies
split), checks the requested class and measures object scale.
"""

from unet_surgery.toy.data import COLOUR_NAMES, IMAGE_SIZE, NUM_CLASSES, SHAPES, make_batch
from unet_surgery.toy.export import export_toy, is_toy_export, load_toy_folder
from unet_surgery.toy.metrics import (
    DEFAULT_METRIC_PARAMS,
    ImageStats,
    analyse_image,
    analyse_images,
    foreground_mask,
    summarise,
)
from unet_surgery.toy.model import (
    DEFAULT_TOY,
    TOY_NAMES,
    ToyDiffusion,
    build_toy,
    load_toy,
    load_toy_config,
    make_ddim_scheduler,
    make_ddpm_scheduler,
)
from unet_surgery.toy.sampling import ddim_timesteps, initial_noise, sample, sample_recipe

__all__ = [
    "COLOUR_NAMES",
    "DEFAULT_METRIC_PARAMS",
    "DEFAULT_TOY",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SHAPES",
    "TOY_NAMES",
    "ImageStats",
    "ToyDiffusion",
    "analyse_image",
    "analyse_images",
    "build_toy",
    "ddim_timesteps",
    "export_toy",
    "foreground_mask",
    "initial_noise",
    "is_toy_export",
    "load_toy",
    "load_toy_config",
    "load_toy_folder",
    "make_batch",
    "make_ddim_scheduler",
    "make_ddpm_scheduler",
    "sample",
    "sample_recipe",
    "summarise",
]
