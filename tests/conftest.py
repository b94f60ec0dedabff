"""Shared fixtures. Maps are expensive (one torch.export each), so they are cached per session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.presets import build_unet


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: with -n 2 on 2 cores, more threads only contend.
    torch.set_num_threads(1)


@functools.cache
def preset_map(name: str, size: str = "full") -> UNetMap:
    """Map of a preset: full size on meta, tiny with real weights on the CPU."""
    device = "meta" if size == "full" else "cpu"
    return map_unet(build_unet(name, size=size, device=device))


@pytest.fixture
def tiny_sd15():
    return build_unet("sd15", size="tiny", device="cpu")
