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
from unet_surgery.generation.run import MKL_REPRODUCIBLE
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.presets import build_unet

# The library's own map cache (unet_surgery.graph.cache) goes to a temporary folder, never the
# user's; its keys carry a digest of the mapper code, so stale entries are never read.
os.environ.setdefault("UNET_SURGERY_CACHE", str(Path(tempfile.gettempdir()) / "unet-surgery-test-cache"))

# MKL's strict reproducibility, as `unet-surgery generate` sets it before it computes anything:
# MKL reads it at its first call, which in a test worker comes long before a generate test, and
# without it a matmul's last bits depend on memory alignment (generated PNGs then differ by one
# level between two loads of the same weights).
os.environ.setdefault(*MKL_REPRODUCIBLE)

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
        unet_map = map_unet(build_unet(name, size=size, device=device), cache=False)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(unet_map.to_json())
        tmp.replace(file)
        return unet_map


REPOSITORY = Path(__file__).resolve().parents[1]
REFERENCE = REPOSITORY.parent / "shared" / "reference"
"""Published reference material (the papers' settings and transforms), beside the checkout."""


def reference_path(*parts: str) -> Path:
    """A file of the shared reference data; skips the test where the data is not laid out
    (a bare checkout), fails under CI (``CI`` set), where it must be."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        message = f"reference data not found: {path} (expected ../shared/reference beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def published_config(name: str) -> dict:
    """The official ScaleCrafter config a shipped scalecrafter-* recipe translates."""
    import yaml

    _, model, res, *rest = name.split("-")
    base = {"sd15": "sd1.5", "sd21": "sd2.1", "sdxl": "sdxl"}[model]
    stem = f"{base}_{res}" + ("_disperse" if rest else "")
    return yaml.safe_load(reference_path("scalecrafter", "configs", f"{stem}.yaml").read_text())


def published_table(rel: str | None) -> dict[str, float]:
    """A published per-layer table (``path:factor`` rows), e.g. ``./assets/dilate_settings/...``."""
    if not rel:
        return {}
    rows = reference_path("scalecrafter", *Path(rel).parts).read_text().split()
    return {p: float(f) for p, f in (row.split(":") for row in rows)}


def ldm_available() -> bool:
    """Whether the original LDM code (stable-diffusion-sdkit's ``ldm``) imports."""
    try:
        import ldm.modules.attention
        import ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``requires_ldm`` tests (and any test parametrized with an ldm_* preset) without ldm."""
    if ldm_available():
        return
    skip = pytest.mark.skip(reason="needs ldm: pip install --no-deps stable-diffusion-sdkit")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        uses_ldm_preset = any(isinstance(v, str) and v.startswith("ldm_") for v in params.values())
        if item.get_closest_marker("requires_ldm") is not None or uses_ldm_preset:
            item.add_marker(skip)


@pytest.fixture
def tiny_sd15():
    return build_unet("sd15", size="tiny", device="cpu")
