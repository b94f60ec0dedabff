"""Shared fixtures. Maps are expensive (one torch.export each), so they are cached per session."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

import unet_surgery
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.presets import build_unet

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: with -n 2 on 2 cores, more threads only contend.
    torch.set_num_threads(1)


def _map_cache_dir() -> Path:
    """A cache shared by xdist workers, keyed by the code that produces maps (never stale)."""
    import diffusers

    digest = hashlib.sha256(f"{torch.__version__} {diffusers.__version__}".encode())
    package = Path(unet_surgery.__file__).parent
    for file in sorted([*package.glob("graph/*.py"), package / "presets.py", *package.glob("architectures/*.json")]):
        digest.update(file.read_bytes())
    path = Path(tempfile.gettempdir()) / f"unet-surgery-test-maps-{digest.hexdigest()[:16]}"
    path.mkdir(exist_ok=True)
    return path


@functools.cache
def preset_map(name: str, size: str = "full") -> UNetMap:
    """Map of a preset: full size on meta, tiny with real weights on the CPU.

    Each map costs one torch.export (10-60 s), so maps are computed once per code version and
    shared between xdist workers through a locked JSON file.
    """
    file = _map_cache_dir() / f"{name}-{size}.json"
    with open(file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if file.exists():
            return UNetMap.from_dict(json.loads(file.read_text()))
        device = "meta" if size == "full" else "cpu"
        unet_map = map_unet(build_unet(name, size=size, device=device))
        tmp = file.with_suffix(".tmp")
        tmp.write_text(unet_map.to_json())
        tmp.replace(file)
        return unet_map


@pytest.fixture
def tiny_sd15():
    return build_unet("sd15", size="tiny", device="cpu")
