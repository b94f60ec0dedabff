"""The toy class-conditional pixel-space diffusion model and its loader.

It is a real diffusers ``UNet2DConditionModel`` (three levels, cross-attention in the two deeper
ones) so that every UNet patch the project applies to Stable Diffusion can be applied, measured
and tested on it on a CPU. Conditioning is a single learned token per class, fed through the
UNet's cross-attention exactly like a one-token text prompt; the last class index is the "empty"
prompt used for classifier-free guidance.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from torch import nn

from unet_surgery.toy.data import COLOUR_NAMES, IMAGE_SIZE, SHAPES, SIZE_RANGE

__all__ = [
    "DEFAULT_TOY",
    "DEFAULT_UNET_CONFIG",
    "EPSILON_TOYS",
    "TEXTURED_TOYS",
    "TOY_ARCHITECTURES",
    "TOY_NAMES",
    "ToyDiffusion",
    "build_toy",
    "default_scheduler_config",
    "load_toy",
    "load_toy_config",
    "make_ddim_scheduler",
    "make_ddpm_scheduler",
    "scaled_linear_scheduler_config",
    "scheduler_config_for",
]

WEIGHTS_PACKAGE = "unet_surgery.toy.weights"
WEIGHTS_NAME = "toy_unet.safetensors"
CONFIG_NAME = "toy_config.json"

_THREE_LEVELS: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
"""``toy``'s layout, which ``toy-detail`` shares (it is ``toy`` fine-tuned on textured data)."""

TOY_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "toy": dict(_THREE_LEVELS),
    "toy4": {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [24, 48, 64, 96],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "toy-detail": dict(_THREE_LEVELS),
    "toy-eps": {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": [
            "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
        ],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 48, 64, 96],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "norm_num_groups": 16,
    },
}
"""UNet configs of the shipped toys (``attention_head_dim`` is, as in SD 1.x configs, the number of
heads). ``toy``: three levels, cross-attention at the deepest; ``toy4``: four levels, other widths,
cross-attention at the two deepest, trained from another seed. Recipes and the automatic policy are
designed on ``toy`` and only *checked* on ``toy4``.

The textured toys draw the same one-object images with a stripe texture of ``texture_period``
pixels on the object and the background (:func:`~unet_surgery.toy.data.make_batch`), so that a
sample above the training size shows whether detail was drawn at the new resolution or blown up.
``toy-detail``: ``toy``'s layout and v/cosine schedule, fine-tuned from ``toy``; ``toy-eps``:
epsilon prediction with Stable Diffusion's scaled-linear schedule and an SD1.5-like layout
(cross-attention at the middle levels, none at the deepest down block), trained from scratch."""

TEXTURED_TOYS: dict[str, float] = {"toy-detail": 4.0, "toy-eps": 4.0}
"""``texture_period`` (pixels) of each textured toy; also stated in its ``toy_config.json``."""

EPSILON_TOYS: frozenset[str] = frozenset({"toy-eps"})

TOY_NAMES: tuple[str, ...] = tuple(TOY_ARCHITECTURES)
DEFAULT_TOY = "toy"
DEFAULT_UNET_CONFIG: dict[str, Any] = TOY_ARCHITECTURES[DEFAULT_TOY]


def scaled_linear_scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.x/2.1-base/XL's training schedule: epsilon, scaled-linear betas."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def scheduler_config_for(name: str) -> dict[str, Any]:
    """The training schedule of toy architecture ``name``."""
    return scaled_linear_scheduler_config() if name in EPSILON_TOYS else default_scheduler_config()


def default_scheduler_config() -> dict[str, Any]:
    """Noise schedule shared by training (DDPM) and sampling (DDIM).

    The cosine schedule keeps enough signal at high ``t`` for 32x32 images, where SD's scaled-linear
    schedule destroys small images too early and wastes most timesteps. The model predicts ``v``
    (as SD 2.x 768 does): at t = 999 the cosine schedule's alpha_bar is ~1e-9, and an eps model's
    x0 estimate there divides its error by ~3e-5, which left a fifth of the first toy's samples
    empty; a v model's x0 estimate stays bounded.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
    }


class ToyDiffusion(nn.Module):
    """A UNet plus a learned class-token table (``num_classes + 1`` rows; the last is "empty")."""

    def __init__(self, unet_config: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.num_classes = num_classes
        self.scheduler_config = default_scheduler_config()
        self.config: dict[str, Any] = {}
        self.name = "untrained"
        self.unet = UNet2DConditionModel(**unet_config)
        self.class_embedding = nn.Embedding(num_classes + 1, unet_config["cross_attention_dim"])
        nn.init.normal_(self.class_embedding.weight, std=1.0)

    @property
    def empty_class(self) -> int:
        """Index of the unconditional ("empty prompt") token used for classifier-free guidance."""
        return self.num_classes

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels ``(B,)`` -> encoder hidden states ``(B, 1, D)`` for cross-attention."""
        return self.class_embedding(labels.to(self.class_embedding.weight.device)).unsqueeze(1)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, labels: torch.Tensor
    ) -> torch.Tensor:
        """Predicted noise for ``sample`` at ``timestep`` given class ``labels``."""
        return self.unet(sample, timestep, encoder_hidden_states=self.encode(labels)).sample


def build_toy(
    unet_config: dict[str, Any] | None = None, num_classes: int = len(SHAPES)
) -> ToyDiffusion:
    """Fresh, randomly initialised toy model (use ``torch.manual_seed`` first for reproducibility)."""
    return ToyDiffusion(dict(unet_config or DEFAULT_UNET_CONFIG), num_classes)


def make_ddpm_scheduler(config: dict[str, Any] | None = None):
    """Training scheduler (adds noise at integer timesteps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or default_scheduler_config()))


def make_ddim_scheduler(config: dict[str, Any] | None = None):
    """Deterministic DDIM sampler over the training schedule.

    "trailing" spacing starts at t = 999 (pure noise, as in training) and the last step lands on
    alpha = 1, so a few steps still begin from noise and end on a clean image. The cosine
    schedule's alpha_bar(999) is ~1e-9, so the x0 estimate there divides by ~3e-5: as in the
    original pixel-space DDPM, x0 is clipped to the data range [-1, 1] (``clip_sample``), which
    keeps the first steps from amplifying the eps error into saturated noise.
    """
    from diffusers import DDIMScheduler

    cfg = dict(config or default_scheduler_config())
    cfg.update(clip_sample=True, clip_sample_range=1.0)
    return DDIMScheduler(**cfg, set_alpha_to_one=True, timestep_spacing="trailing")


def _check_name(name: str) -> str:
    if name not in TOY_ARCHITECTURES:
        raise ValueError(f"unknown toy {name!r}; shipped toys: {', '.join(TOY_NAMES)}")
    return name


def load_toy_config(name: str = DEFAULT_TOY) -> dict[str, Any]:
    """The shipped ``toy_config.json`` of toy ``name`` (UNet config, classes, schedule, training)."""
    folder = resources.files(WEIGHTS_PACKAGE).joinpath(_check_name(name))
    return json.loads(folder.joinpath(CONFIG_NAME).read_text(encoding="utf-8"))


def load_toy(
    name: str = DEFAULT_TOY,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ToyDiffusion:
    """The shipped, trained toy ``name`` in ``eval()`` mode; reads package files only, no network."""
    from safetensors.torch import load

    config = load_toy_config(name)
    with torch.device("meta"):
        toy = ToyDiffusion(config["unet"], config["num_classes"])
    folder = resources.files(WEIGHTS_PACKAGE).joinpath(name)
    blob = folder.joinpath(WEIGHTS_NAME).read_bytes()
    state = {k: v.to(torch.float32) for k, v in load(blob).items()}
    toy.load_state_dict(state, strict=True, assign=True)
    toy.scheduler_config = dict(config["scheduler"])
    toy.config = config
    toy.name = name
    return toy.to(device=device, dtype=dtype).eval()


def toy_metadata() -> dict[str, Any]:
    """Data description stored in the config, so the shipped model documents what it was taught."""
    return {
        "class_names": list(SHAPES),
        "colour_names": list(COLOUR_NAMES),
        "image_size": IMAGE_SIZE,
        "size_range": list(SIZE_RANGE),
    }
