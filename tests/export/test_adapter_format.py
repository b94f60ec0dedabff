"""Adapter format 3: the recipe, one R per distinct transform and the fingerprint, no kernels.

Stored R is compared with the published ``R20to1_new.mat``; a changed R is refused even when an
attacker re-hashes the files. Format-2 adapters (one dispersed kernel and one R per layer) are
written by hand here from the format-2 layout and still load, with their kernels checked
against the ones the published inflation gives for the base weights, then ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import scipy.io
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import preset_map, reference_path
from unet_surgery import apply
from unet_surgery.errors import CheckpointError
from unet_surgery.export import load_patch, save_patch
from unet_surgery.ops import dispersion_transform
from unet_surgery.ops.rewrite import is_rewritten
from unet_surgery.presets import build_unet, example_inputs

RECIPE = "scalecrafter-sd15-2048x2048-disperse-active"
KEY = "dispersion_R/3-5-2-3-0.05"  # small-large-scale-input_size-eta of the published transform


def published_R() -> torch.Tensor:
    return torch.tensor(scipy.io.loadmat(reference_path("scalecrafter", "transforms", "R20to1_new.mat"))["R"]).contiguous()


def published_paths() -> list[str]:
    """SD1.5 2048x2048 dispersed layers, from the published assets/disperse_settings table."""
    return reference_path("scalecrafter", "assets", "disperse_settings", "sd1.5_2048x2048.txt").read_text().split()


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def reseal(folder: Path, tensors: dict[str, torch.Tensor], version: int) -> None:
    """Write ``tensors`` as adapter.safetensors and re-hash everything (an attacker who knows the format)."""
    meta = json.loads((folder / "adapter.json").read_text())
    save_file(tensors, str(folder / "adapter.safetensors"), metadata={"format": "pt", "recipe": meta["recipe"]})
    meta["version"] = version
    meta["files"] = {name: sha256(folder / name) for name in ("recipe.yaml", "adapter.safetensors")}
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    meta["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (folder / "adapter.json").write_text(json.dumps(meta, indent=2))


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@functools.cache
def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The tiny SD1.5 base, shared: every patch on it is removed (bit-exact) before the test ends."""
    return build_unet("sd15", size="tiny", device="cpu", dtype=dtype)


def saved(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    with apply(model(dtype), RECIPE, unet_map=preset_map("sd15", "tiny"), force=True) as patch:
        save_patch(patch, tmp_path / "adapter")
    return tmp_path / "adapter"


def load(folder: Path, dtype: torch.dtype = torch.float32, **kwargs) -> None:
    base = model(dtype)
    try:
        load_patch(base, folder, unet_map=preset_map("sd15", "tiny"), **kwargs).remove()
    finally:
        assert not any(is_rewritten(m) for m in base.modules())


def test_format_3_stores_one_published_R_and_no_kernels(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors", "recipe.yaml"]
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["version"] == 3 and meta["fingerprint"].startswith("sha256:")
    tensors = load_file(str(folder / "adapter.safetensors"))
    assert list(tensors) == [KEY]
    assert tensors[KEY].dtype == torch.float64
    torch.testing.assert_close(tensors[KEY], published_R(), rtol=0, atol=1e-13)
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 100_000, total  # the bar; the layer list and R are the same at full size
    assert (folder / "adapter.safetensors").stat().st_size < 25 * 9 * 8 + 512  # R and a header, nothing else


def test_a_changed_R_is_refused_even_rehashed_and_rounding_is_accepted(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    R = load_file(str(folder / "adapter.safetensors"))[KEY]
    reseal(folder, {KEY: torch.nextafter(R, R + 1)}, 3)  # one float64 ulp: a LAPACK difference
    load(folder)
    load(folder, verify_fingerprint=False, force=True)
    reseal(folder, {KEY: R + 1e-6}, 3)
    for kwargs in ({}, {"verify_fingerprint": False, "force": True}):  # R does not depend on the weights: always checked
        with pytest.raises(CheckpointError, match=f"{KEY} computed by this unet-surgery .* differs from the stored one"):
            load(folder, **kwargs)
    reseal(folder, {KEY: R.float()}, 3)  # R rounded to float32: not float64 rounding
    with pytest.raises(CheckpointError, match=f"stored {KEY} is torch.float32, expected torch.float64"):
        load(folder)
    reseal(folder, {"dispersion_R/3-5-2-3-0.1": R}, 3)  # another transform than the recipe's
    with pytest.raises(CheckpointError, match="stored tensors do not match"):
        load(folder)
    reseal(folder, {KEY: R, "up_blocks.1.resnets.0.conv1.dispersed_weight": torch.zeros(1)}, 3)
    with pytest.raises(CheckpointError, match="stored tensors do not match"):
        load(folder)


def official_inflate(weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """ScaleCrafter's inflate_kernels, transcribed: vec(W5) = R @ vec(W3) per (out, in) pair (float64, cast back)."""
    i, o = weight.shape[:2]
    k = int(math.sqrt(R.shape[0]))
    w = weight.detach().to(torch.float64)
    return torch.einsum("mn,ion->iom", R, w.reshape(i, o, -1)).reshape(i, o, k, k).to(weight.dtype).contiguous()


def write_v2(folder: Path, base: nn.Module, R: torch.Tensor, scale: float = 1.0) -> None:
    """Format 2: per dispersed layer ``<path>.dispersed_weight`` (the kernel in the weights' dtype)
    and ``<path>.dispersion_R`` (float64), with adapter.json version 2 (same fields as 3)."""
    tensors = {}
    for path in published_paths():
        tensors[path + ".dispersed_weight"] = official_inflate(base.get_submodule(path).weight, R) * scale
        tensors[path + ".dispersion_R"] = R.clone()
    reseal(folder, tensors, 2)


# float64 weights: kernels from the published R (compared to float64 rounding); float32: the
# kernels the format-2 writer stored exactly (its R was this library's solution).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_format_2_adapters_load_and_their_kernels_are_checked_then_ignored(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = saved(tmp_path, dtype)
    R = published_R() if dtype == torch.float64 else torch.from_numpy(dispersion_transform().copy())
    v2 = tmp_path / "v2"
    shutil.copytree(folder, v2)
    write_v2(v2, model(dtype), R)
    inputs = example_inputs(model(dtype), height=128, width=128, dtype=dtype)
    reference = model(dtype)
    with apply(reference, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True):
        expected = run(reference, inputs)
    for adapter in (folder, v2):
        base = model(dtype)
        with load_patch(base, adapter, unet_map=preset_map("sd15", "tiny")):
            assert torch.equal(run(base, inputs), expected)
    write_v2(v2, model(dtype), R, scale=1.001)  # kernels of other weights than the fingerprinted base
    with pytest.raises(CheckpointError, match=r"\.dispersed_weight computed by this unet-surgery .* export the adapter again"):
        load(v2, dtype)
    load(v2, dtype, verify_fingerprint=False, force=True)  # as in format 2: no kernel check without the fingerprint check
