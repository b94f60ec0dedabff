"""Architecture presets: the real UNet configs as data, buildable without weights.

Mapping and patching code needs the exact module tree of the published UNets, but nobody
can download multi-gigabyte checkpoints in a test. So each preset ships the hub's
``config.json`` (under ``unet_surgery/architectures/``) and can be built

* full-size on the ``meta`` device: the true module tree and parameter shapes, no memory;
* tiny with real random weights: same levels, block types, ``layers_per_block`` and attention
  layout, small widths; fast enough for numerical tests on a CPU.

Random weights alone are a trap: both UNet families zero-initialise output layers (LDM
``out.2``, resblock ``out_layers.3``, transformer ``proj_out``; diffusers temporal convs and
motion-module ``proj_out``), which makes whole branches vanish and comparisons pass
trivially. :func:`randomize_zero_init_` undoes that.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import nn

from unet_surgery.errors import PresetError
from unet_surgery.graph.inputs import CALL_SPECS, call_inputs, facts_from_config


@cache
def _read_json(filename: str) -> dict[str, Any]:
    """Read one packaged architecture file (cached; callers get deep copies)."""
    try:
        text = resources.files("unet_surgery.architectures").joinpath(filename).read_text("utf-8")
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise PresetError(f"cannot read architecture file {filename!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise PresetError(f"architecture file {filename!r} must hold a JSON object")
    return data


PRESETS: tuple[str, ...] = tuple(_read_json("presets.json")["presets"])
"""Preset names, in the order of ``architectures/presets.json``."""
SIZES: tuple[str, ...] = ("full", "tiny")

_DIFFUSERS_HINT = "install the diffusers extra: pip install 'unet-surgery[diffusers]'"
_LDM_HINT = "pip install --no-deps stable-diffusion-sdkit einops omegaconf (and pillow)"
_LDM_CLASS = "ldm.modules.diffusionmodules.openaimodel.UNetModel"

# Frames a tiny video example uses by default: odd and > 1 so batch/frame mix-ups show.
_TINY_FRAMES = 3
# Pixel size of tiny examples: 8x8 latents suit every preset's down-sampling depth; SVD
# stays landscape so height/width swaps fail loudly.
_TINY_RESOLUTION: dict[str, tuple[int, int]] = {"svd": (64, 128)}
_TINY_DEFAULT_RESOLUTION = (64, 64)


@dataclass(frozen=True)
class Preset:
    """What a preset is, beyond its config: how to feed it and what it should count.

    ``in_channels`` is what the UNet's ``conv_in`` takes (8 for SVD: noisy latents plus the
    conditioning image latents), ``latent_channels`` what the VAE produces and the UNet
    predicts.
    """

    name: str
    family: str  # "diffusers" or "ldm"
    model_class: str
    description: str
    source: str  # Hugging Face repo (and subfolder) the config comes from
    config_file: str
    base_height: int
    base_width: int
    vae_scale_factor: int
    is_video: bool
    num_frames: int | None
    latent_channels: int
    in_channels: int
    out_channels: int
    cross_attention_dim: int
    levels: int
    full_param_count: int
    adapter_config_file: str | None = None

    @property
    def base_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels the model was trained at."""
        return (self.base_height, self.base_width)

    @property
    def base_latent_size(self) -> tuple[int, int]:
        """(height, width) of the latents at the base resolution."""
        return (self.base_height // self.vae_scale_factor, self.base_width // self.vae_scale_factor)


# ----------------------------------------------------------------------------- lookup


def list_presets() -> list[str]:
    """Names accepted by :func:`build_unet` and friends, in a stable order."""
    return list(PRESETS)


def _closest(key: str) -> str | None:
    """Best difflib match; ties (sd16 is as close to sd21 as to sd15) go to the longer prefix."""
    candidates = difflib.get_close_matches(key, PRESETS, n=len(PRESETS), cutoff=0.4)
    if not candidates:
        return None

    def score(candidate: str) -> tuple[float, int]:
        ratio = difflib.SequenceMatcher(None, key, candidate).ratio()
        prefix = next(
            (i for i, (a, b) in enumerate(zip(key, candidate, strict=False)) if a != b),
            min(len(key), len(candidate)),
        )
        return (ratio, prefix)

    return max(candidates, key=score)


def _check_name(name: str) -> str:
    """Return the canonical name or raise a PresetError that helps fix the typo."""
    if not isinstance(name, str):
        raise PresetError(f"preset name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in PRESETS:
        return key
    close = _closest(key)
    hint = f" Did you mean {close!r}?" if close else ""
    raise PresetError(f"unknown preset {name!r}.{hint} Valid presets: {', '.join(PRESETS)}")


def _check_size(size: str) -> str:
    if size not in SIZES:
        raise PresetError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return size


def _meta(key: str) -> dict[str, Any]:
    """What ``presets.json`` says of a preset beyond its config (a copy)."""
    return dict(_read_json("presets.json")["presets"][key])


def _tiny_overrides(key: str) -> dict[str, Any]:
    table = _read_json("tiny.json")
    if key not in table:
        raise PresetError(f"tiny.json has no entry for {key!r}")
    return copy.deepcopy(table[key])


def preset_config(name: str, *, size: str = "full") -> dict[str, Any]:
    """The stored config of a preset (a deep copy, safe to edit).

    Diffusers presets give the hub's ``config.json`` dict; ``animatediff`` gives
    ``{"unet": ..., "motion_adapter": ...}`` because it is built from two configs; LDM presets
    give ``{"target": ..., "params": ...}`` like the original YAML. ``size="tiny"`` applies the
    tiny overrides from ``tiny.json``.
    """
    key = _check_name(name)
    _check_size(size)
    meta = _meta(key)
    cfg = copy.deepcopy(_read_json(meta["config_file"]))
    if meta["family"] == "ldm":
        if size == "tiny":
            cfg["params"].update(_tiny_overrides(key))
        return cfg
    if size == "tiny":
        cfg.update(_tiny_overrides(key))
    if meta.get("adapter_config_file") is None:
        return cfg
    adapter = copy.deepcopy(_read_json(meta["adapter_config_file"]))
    if size == "tiny":
        adapter.update(_tiny_overrides("animatediff_motion_adapter"))
    return {"unet": cfg, "motion_adapter": adapter}


def get_preset(name: str) -> Preset:
    """The :class:`Preset` record of ``name``, with shape facts read from its config."""
    return _get_preset(_check_name(name))


@cache
def _get_preset(key: str) -> Preset:
    meta = _meta(key)
    cfg = preset_config(key)
    if meta["family"] == "ldm":
        params = cfg["params"]
        derived = dict(
            in_channels=params["in_channels"],
            out_channels=params["out_channels"],
            cross_attention_dim=params["context_dim"],
            levels=len(params["channel_mult"]),
        )
    else:
        unet_cfg = cfg.get("unet", cfg)
        derived = dict(
            in_channels=unet_cfg["in_channels"],
            out_channels=unet_cfg["out_channels"],
            cross_attention_dim=unet_cfg["cross_attention_dim"],
            levels=len(unet_cfg["block_out_channels"]),
        )
    return Preset(
        name=key,
        vae_scale_factor=8,
        is_video=meta["num_frames"] is not None,
        latent_channels=derived["out_channels"],
        **derived,
        **meta,
    )


# ----------------------------------------------------------------------------- building


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise PresetError(
            f"diffusers presets need the diffusers package; {_DIFFUSERS_HINT}"
        ) from exc
    return diffusers


def _import_ldm_unet() -> type[nn.Module]:
    try:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise PresetError(
            f"LDM presets need the original CompVis ldm package (missing: {missing}); {_LDM_HINT}"
        ) from exc
    return UNetModel


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings (e.g. from_unet2d's dtype cast notice) during a build."""
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:
        yield
        return
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


# Bounds a diffusers UNet config must respect before anything is built: the largest published
# UNets (SDXL, SVD) are far inside them, and a hostile config.json cannot make ``from_config``
# allocate or loop without end (``layers_per_block: 1000000`` would build a million layers).
CONFIG_MAX_NUMBER = 1_000_000
CONFIG_LIMITS = {
    "layers_per_block": (1, 16),
    "transformer_layers_per_block": (1, 64),
    "block_out_channels": (1, 16_384),
    "in_channels": (1, 1024),
    "out_channels": (1, 1024),
    "norm_num_groups": (1, 1024),
    "cross_attention_dim": (1, 16_384),
    "attention_head_dim": (1, 4096),
    "num_attention_heads": (1, 4096),
    "sample_size": (1, 16_384),
    "num_frames": (1, 4096),
}
CONFIG_MAX_BLOCKS = 8
CONFIG_MAX_PARAMETERS = 20_000_000_000


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value]


def check_config_bounds(config: dict[str, Any], where: str) -> None:
    """Refuse a UNet config whose sizes are absurd, before a module is built (one clear line)."""
    for key, value in config.items():
        for number in _numbers(value):
            if isinstance(number, (int, float)) and not isinstance(number, bool) and abs(number) > CONFIG_MAX_NUMBER:
                raise PresetError(f"{where}: {key} = {str(number)[:30]} is out of range (|value| <= {CONFIG_MAX_NUMBER})")
    for key, (low, high) in CONFIG_LIMITS.items():
        if key not in config or config[key] is None:
            continue
        for number in _numbers(config[key]):
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise PresetError(f"{where}: {key} must hold integers in [{low}, {high}], got {str(config[key])[:60]}")
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= CONFIG_MAX_BLOCKS):
            raise PresetError(f"{where}: {key} must be a list of 1 to {CONFIG_MAX_BLOCKS} entries")
    widths = [int(w) for w in config.get("block_out_channels") or [320]]
    layers = max([int(n) for n in _numbers(config.get("layers_per_block", 2))] or [2])
    depth = max([int(n) for n in _numbers(config.get("transformer_layers_per_block", 1)) if n is not None] or [1])
    estimate = sum(3 * (layers + 1) * (18 + 12 * depth) * w * w for w in widths)  # resnets + transformers, both paths
    if estimate > CONFIG_MAX_PARAMETERS:
        raise PresetError(f"{where}: this config describes a UNet of about {estimate:.2e} parameters; refusing to build it")


def from_config(cls: Any, config: dict[str, Any], where: str) -> nn.Module:
    """``cls.from_config`` after :func:`check_config_bounds`; a config it rejects is one clear error."""
    check_config_bounds(config, where)
    try:
        with _quiet_diffusers():
            return cls.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        raise PresetError(f"{where}: {cls.__name__} cannot be built from this config ({text[0][:200] if text else type(exc).__name__})") from exc


def _strip_private(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _construct(key: str, size: str) -> nn.Module:
    """Instantiate the preset's module on whatever device/RNG context is active."""
    meta = _meta(key)
    cfg = preset_config(key, size=size)
    if meta["family"] == "ldm":
        if cfg.get("target") != _LDM_CLASS:
            raise PresetError(f"{meta['config_file']}: unsupported target {cfg.get('target')!r}")
        return _import_ldm_unet()(**cfg["params"])
    diffusers = _import_diffusers()
    with _quiet_diffusers():
        if key == "animatediff":
            unet = diffusers.UNet2DConditionModel.from_config(_strip_private(cfg["unet"]))
            adapter = diffusers.MotionAdapter.from_config(_strip_private(cfg["motion_adapter"]))
            return diffusers.UNetMotionModel.from_unet2d(unet, adapter)
        cls = getattr(diffusers, meta["model_class"])
        return cls.from_config(_strip_private(cfg))


def build_unet(
    name: str,
    *,
    size: str = "full",
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """Build a preset's UNet.

    On ``meta`` nothing is allocated (full SDXL builds in well under a second). On a real
    device the model is initialised on the CPU under ``torch.manual_seed(seed)`` (the caller's
    RNG state is left untouched), zero-initialised parameters are re-randomised, and only then
    is it moved: so the same ``seed`` gives bit-identical weights on every device.
    The model is tagged with ``unet_surgery_preset`` and ``unet_surgery_size`` so
    :func:`example_inputs` can be handed the model itself.

    Args:
        name: a preset name (:func:`list_presets`).
        size: ``full`` (the published config) or ``tiny`` (small widths, same layout).
        device: ``meta`` (no memory) or a real device (random weights).
        dtype: parameter dtype.
        seed: seed of the random weights.
    """
    key = _check_name(name)
    _check_size(size)
    target = torch.device(device)
    is_ldm = _meta(key)["family"] == "ldm"
    if is_ldm and target.type != "meta" and dtype != torch.float32:
        raise PresetError(
            f"{key}: the LDM UNetModel only runs with float32 weights (its GroupNorm32 upcasts "
            "activations and the timestep embedding is float32); build in float32 and use "
            f"torch.autocast for reduced precision instead of dtype={dtype}"
        )
    if target.type == "meta":
        with torch.device("meta"):
            model = _construct(key, size)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("cpu"):
                model = _construct(key, size)
        randomize_zero_init_(model, seed, include_constant=True)
    with _quiet_diffusers():
        model = model.to(device=target, dtype=dtype)
    tagged: Any = model  # plain attributes, not submodules (nn.Module.__setattr__ types them so)
    if is_ldm:
        # UNetModel.forward casts activations to this attribute, fixed to fp32/fp16 at init.
        tagged.dtype = dtype
    model.eval()
    tagged.unet_surgery_preset = key
    tagged.unet_surgery_size = size
    return model


@torch.no_grad()
def randomize_zero_init_(
    model: nn.Module, seed: int = 0, *, std: float = 0.02, include_constant: bool = False
) -> list[str]:
    """Give every all-zero parameter small random values; return the names touched.

    Zero-initialised output convs/projections make residual branches exact no-ops, so a
    broken patch that skips or mangles them still "matches" the reference. Norm biases and
    similar legitimately start at zero too; randomising them is intended (they are trained
    away from zero in real checkpoints anyway). With ``include_constant`` parameters whose
    elements are all equal but non-zero (norm weights of ones, SVD's scalar mix factors) get a
    relative jitter of ``std`` so swapped norms are also caught. Deterministic in ``seed`` and
    the parameter order; meta parameters are skipped.

    Args:
        model: the module to change in place.
        seed: seed of the values.
        std: standard deviation of the values (relative, for constant parameters).
        include_constant: also jitter parameters whose elements are all equal but non-zero.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed + 0x5EED)
    touched: list[str] = []
    for pname, param in model.named_parameters():
        if param.device.type == "meta" or param.numel() == 0:
            continue
        flat = param.detach()
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if not bool(flat.any()):
            param.copy_((noise * std).to(param.dtype))
            touched.append(pname)
        elif include_constant and bool((flat == flat.reshape(-1)[0]).all()):
            base = flat.float().cpu()
            param.copy_((base + noise * std * base.abs()).to(param.dtype))
            touched.append(pname)
    return touched


# ----------------------------------------------------------------------------- inputs


def _resolve_target(target: str | Preset | nn.Module, size: str | None) -> tuple[Preset, str]:
    """Accept a preset name, a Preset, or a model tagged by build_unet."""
    if isinstance(target, nn.Module):
        key = getattr(target, "unet_surgery_preset", None)
        if key is None:
            raise PresetError(
                f"{type(target).__name__} was not built by build_unet; pass the preset name instead"
            )
        return get_preset(key), _check_size(str(size or getattr(target, "unet_surgery_size", "full")))
    if isinstance(target, Preset):
        return target, _check_size(size or "full")
    return get_preset(target), _check_size(size or "full")


def _randn(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def example_inputs(
    target: str | Preset | nn.Module,
    *,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one forward call: ``model(**example_inputs(...))``.

    ``height``/``width`` are pixels (default: the base resolution for full size, 64x64 for tiny
    or 64x128 for tiny SVD); latents are 1/8 of that. Each video UNet wants its own layout:

    * ``UNetMotionModel``: sample (B, C, F, h, w) and encoder_hidden_states already repeated
      per frame, (B*F, tokens, dim) -- it does not repeat them itself;
    * ``UNet3DConditionModel``: sample (B, C, F, h, w), encoder_hidden_states (B, tokens, dim);
    * ``UNetSpatioTemporalConditionModel``: sample (B, F, C, h, w), encoder_hidden_states
      (B, 1, dim) (one CLIP image embedding), added_time_ids (B, 3) = fps, motion bucket,
      noise augmentation.

    LDM ``UNetModel`` takes ``x``, ``timesteps`` and ``context``. On ``meta`` tensors are
    empty; otherwise they are drawn from ``seed``.

    Args:
        target: a preset name, a :class:`Preset` or a model built by :func:`build_unet`.
        batch: batch size.
        height: image height in pixels.
        width: image width in pixels.
        num_frames: frames, for video UNets (default: the preset's).
        device: where to put the tensors (``meta``: empty).
        dtype: floating dtype of the tensors.
        size: ``full`` or ``tiny`` (default: the model's tag, else ``full``).
        seed: seed of the random tensors.
    """
    preset, size = _resolve_target(target, size)
    if batch < 1:
        raise PresetError(f"batch must be >= 1, got {batch}")
    cfg = preset_config(preset.name, size=size)
    if size == "full":
        default_hw = preset.base_resolution
        default_frames = preset.num_frames
    else:
        default_hw = _TINY_RESOLUTION.get(preset.name, _TINY_DEFAULT_RESOLUTION)
        default_frames = _TINY_FRAMES
    h_px = default_hw[0] if height is None else height
    w_px = default_hw[1] if width is None else width
    vsf = preset.vae_scale_factor
    if h_px <= 0 or w_px <= 0 or h_px % vsf or w_px % vsf:
        raise PresetError(
            f"height and width must be positive multiples of {vsf}, got {h_px}x{w_px}"
        )
    h, w = h_px // vsf, w_px // vsf
    frames = default_frames if num_frames is None else num_frames
    if preset.is_video and (frames is None or frames < 1):
        raise PresetError(f"num_frames must be >= 1, got {frames}")

    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    spec = CALL_SPECS[preset.model_class]
    facts = facts_from_config(preset.model_class, cfg["params"] if preset.family == "ldm" else cfg.get("unet", cfg))

    def time_ids(kind: str, rows: int) -> torch.Tensor:
        if kind == "svd":  # fps, motion bucket, noise augmentation
            ids = torch.tensor([6.0, 127.0, 0.02])
        else:  # SDXL: original size, crop top-left, target size
            ids = torch.tensor([h_px, w_px, 0, 0, h_px, w_px], dtype=torch.float32)
        return ids.repeat(rows, 1).to(device=dev, dtype=dtype)

    return call_inputs(
        spec,
        facts,
        batch=batch,
        latent_hw=(h, w),
        frames=frames if preset.is_video else None,
        tokens=77,
        tensor=lambda shape: _randn(shape, gen, dev, dtype),
        timestep=torch.full((batch,), 999, dtype=torch.long, device=dev),
        time_ids=time_ids,
        labels=lambda shape: torch.zeros(*shape, dtype=torch.long, device=dev),
    )


def expected_output_shape(
    target: str | Preset | nn.Module, inputs: dict[str, Any]
) -> tuple[int, ...]:
    """Shape the UNet's prediction must have for ``inputs`` from :func:`example_inputs`."""
    preset, _ = _resolve_target(target, None)
    spec = CALL_SPECS[preset.model_class]
    shape = list(inputs[spec.sample].shape)
    shape[spec.channel_dim] = preset.out_channels
    return tuple(shape)
