"""When to decode in tiles: the VAE decoder's peak memory against what the device has free.

The decoder's largest tensors are its full-resolution feature maps: at the last up block the
input still has the second-finest width (``block_out_channels[-2]``, 256 for SD/SDXL) at the
full image size. A resnet there holds about four such maps at once (input, normalised copy,
conv output, residual), so the peak is estimated as

    peak = 4 * max over up levels (channels in or out) * H_level * W_level * bytes per value

and tiled decoding (with slicing) is switched on when ``peak`` exceeds half of the device's free
memory, measured after the pipeline is loaded. For SD1.5 in fp16 that is about 2 GiB at
1024x1024 and 32 GiB at 4096x4096.
"""

from __future__ import annotations

import os
from typing import Any

import torch

ACTIVATIONS_AT_PEAK = 4
FREE_FRACTION = 0.5


def decode_peak_bytes(block_out_channels: list[int] | tuple[int, ...], height: int, width: int,
                      dtype: torch.dtype) -> int:
    """Estimated peak of decoding one ``height`` x ``width`` image (see the module docstring)."""
    widths = list(reversed(block_out_channels))  # the decoder's up blocks, coarsest first
    levels = len(widths)
    itemsize = torch.empty((), dtype=dtype).element_size()
    largest = 0
    for i, channels in enumerate(widths):
        scale = 2 ** (levels - 1 - i)  # block i runs at the image size / scale
        wider = max(channels, widths[i - 1]) if i else channels
        largest = max(largest, wider * (height // scale) * (width // scale))
    return ACTIVATIONS_AT_PEAK * largest * itemsize


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: CUDA's own count, else the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; without it, the POSIX page counts
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def needs_tiling(peak: int, free: int) -> bool:
    return peak > FREE_FRACTION * free


def configure_vae(pipe: Any, height: int, width: int, tiling: bool | None) -> bool:
    """Switch tiled and sliced decoding on (``tiling=True``, or ``None`` and the rule says so) or off."""
    vae = pipe.vae
    if tiling is None:
        peak = decode_peak_bytes(vae.config.block_out_channels, height, width, vae.dtype)
        tiling = needs_tiling(peak, free_bytes(vae.device))
    if tiling:
        vae.enable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()
    return tiling
