"""The map cache: one map per architecture, never a stale one.

Expected values: a map computed without the cache (``preset_map`` maps with ``cache=False``),
and counts of how often the build function runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import ldm_available, preset_map
from unet_surgery.errors import MappingError
from unet_surgery.graph import cache as map_cache
from unet_surgery.graph import map_unet, mapper
from unet_surgery.graph.mapper import DEFAULT_PROBE
from unet_surgery.graph.records import UNetMap
from unet_surgery.presets import PRESETS, build_unet

PROBE = DEFAULT_PROBE


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNET_SURGERY_CACHE", str(tmp_path))
    monkeypatch.delenv("UNET_SURGERY_NO_MAP_CACHE", raising=False)
    map_cache.clear_memory()
    yield tmp_path
    map_cache.clear_memory()


def small(dilation: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=dilation, dilation=dilation), nn.SiLU(), nn.Conv2d(8, 4, 1))


def with_buffer(model: nn.Module, size: int) -> nn.Module:
    model.register_buffer("table", torch.zeros(size))
    return model


class _Config(dict):
    """A diffusers-like config: a mapping whose private keys (``_name_or_path``...) say where
    the weights came from, not what the model is."""


def with_config(model: nn.Module, config: dict) -> nn.Module:
    model.config = _Config({"in_channels": 4, "sample_size": 64, "_name_or_path": "/models/a", **config})
    return model


class Builds:
    """A build function that counts its calls and returns a distinct small map each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> UNetMap:
        self.calls += 1
        return UNetMap(model_class=f"Build{self.calls}", method="export", convs=[], attentions=[], skips=[],
                       num_levels=1, probe_latent=(1, 4, 8, 8))


def test_same_architecture_other_weights_device_and_dtype_share_one_entry() -> None:
    build = Builds()
    first = map_cache.cached_map(small(seed=0), PROBE, build)
    again = map_cache.cached_map(small(seed=1).double(), PROBE, build)
    on_meta = map_cache.cached_map(small(seed=2).to("meta"), PROBE, build)
    assert build.calls == 1
    assert first.to_dict() == again.to_dict() == on_meta.to_dict()
    again.notes.append("edited by a caller")  # callers get copies: the entry is untouched
    assert map_cache.cached_map(small(), PROBE, build).notes == []


@pytest.mark.parametrize(
    "change",
    ["dilation", "shape", "buffer", "config", "probe", "code", "torch", "diffusers"],
)
def test_anything_a_map_depends_on_changes_the_key(change: str, monkeypatch) -> None:
    build = Builds()
    map_cache.cached_map(small(), PROBE, build)
    model, probe = small(), PROBE
    if change == "dilation":  # same parameters, other conv setting
        model = small(dilation=2)
    elif change == "shape":
        model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 4, 1))
    elif change == "buffer":  # same modules and parameters, plus a buffer (a table a forward may read)
        model = with_buffer(small(), 8)
    elif change == "config":  # a setting of the diffusers config
        model = with_config(small(), {"sample_size": 96})
    elif change == "probe":
        probe = {**PROBE, "latent_hw": [64, 96]}
    elif change == "code":
        monkeypatch.setattr(map_cache, "code_digest", lambda: "another mapper")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    elif change == "diffusers":  # its forward code is traced too
        real = map_cache.metadata.version
        monkeypatch.setattr(map_cache.metadata, "version", lambda name: "9.9.9" if name == "diffusers" else real(name))
    out = map_cache.cached_map(model, probe, build)
    assert build.calls == 2 and out.model_class == "Build2"


def test_entries_survive_the_process_and_corrupt_ones_are_rebuilt(private_cache) -> None:
    build = Builds()
    map_cache.cached_map(small(), PROBE, build)
    map_cache.clear_memory()  # a new process: only the folder is left
    assert map_cache.cached_map(small(), PROBE, build).model_class == "Build1" and build.calls == 1
    (file,) = (private_cache / "maps").glob("*.json")
    file.write_text("{not json")
    map_cache.clear_memory()
    assert map_cache.cached_map(small(), PROBE, build).model_class == "Build2"
    assert json.loads(file.read_text())["model_class"] == "Build2"  # and the entry is repaired


@pytest.mark.parametrize(("value", "on"), [("1", False), ("yes", False), ("0", True), ("", True)])
def test_the_cache_can_be_switched_off(value: str, on: bool, monkeypatch, private_cache) -> None:
    """``UNET_SURGERY_NO_MAP_CACHE=1`` (any value but empty or 0) switches the cache off."""
    monkeypatch.setenv("UNET_SURGERY_NO_MAP_CACHE", value)
    build = Builds()
    map_cache.cached_map(small(), PROBE, build)
    map_cache.cached_map(small(), PROBE, build)
    assert build.calls == (1 if on else 2) and (private_cache / "maps").exists() == on


def test_where_the_weights_came_from_does_not_change_the_key() -> None:
    """The config's private keys (``_name_or_path``, ``_diffusers_version``) name a folder, not an architecture."""
    build = Builds()
    map_cache.cached_map(with_config(small(), {}), PROBE, build)
    other = map_cache.cached_map(with_config(small(), {"_name_or_path": "/models/b", "_diffusers_version": "0.1"}),
                                 PROBE, build)
    assert build.calls == 1 and other.model_class == "Build1"


def test_map_unet_maps_an_architecture_once(monkeypatch) -> None:
    """The second map of a tiny SD1.5 (other seed, on meta) runs no export and no probe, and
    both equal the map computed without the cache."""
    fresh = preset_map("sd15", "tiny").to_dict()
    first = map_unet(build_unet("sd15", size="tiny", device="cpu", seed=0))

    def refuse(*args, **kwargs):
        raise AssertionError("mapped again")

    monkeypatch.setattr(mapper, "export_unet", refuse)
    monkeypatch.setattr(mapper, "probe_unet", refuse)
    second = map_unet(build_unet("sd15", size="tiny", device="meta", seed=1))
    assert first.to_dict() == second.to_dict() == fresh
    with pytest.raises(MappingError, match="mapped again"):  # cache=False always maps
        map_unet(build_unet("sd15", size="tiny", device="meta"), cache=False)


def _shipped_index() -> dict:
    index_file = map_cache.shipped_dir() / "index.json"
    index = json.loads(index_file.read_text())
    if index["versions"] != map_cache.versions():
        pytest.skip(f"the shipped maps are for {index['versions']}, this is {map_cache.versions()}")
    assert index["code"] == map_cache.code_digest(), "the mapper changed: run python scripts/ship_maps.py"
    return index


@pytest.mark.parametrize("name", PRESETS)
def test_shipped_map_of_every_preset_is_the_map_computed_now(name: str) -> None:
    if name.startswith("ldm_") and not ldm_available():
        pytest.skip("needs ldm")
    index = _shipped_index()
    key = map_cache.map_key(build_unet(name), DEFAULT_PROBE)
    assert index["presets"][name] == key
    shipped = json.loads((map_cache.shipped_dir() / f"{key}.json").read_text())
    assert UNetMap.from_dict(shipped).to_dict() == preset_map(name, "full").to_dict()  # mapped without cache


def test_a_shipped_architecture_is_never_exported(monkeypatch) -> None:
    """Full SDXL with an empty user cache: its map comes from the package, no export runs."""
    _shipped_index()

    def refuse(*args, **kwargs):
        raise AssertionError("mapped again")

    monkeypatch.setattr(mapper, "export_unet", refuse)
    monkeypatch.setattr(mapper, "probe_unet", refuse)
    assert map_unet(build_unet("sdxl")).to_dict() == preset_map("sdxl", "full").to_dict()


def test_cpu_and_cuda_builds_of_one_torch_version_share_an_entry(monkeypatch) -> None:
    """``2.13.0+cpu`` and ``2.13.0+cu128`` are one release: the same forward code is traced."""
    build = Builds()
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    map_cache.cached_map(small(), PROBE, build)
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    assert map_cache.cached_map(small(), PROBE, build).model_class == "Build1" and build.calls == 1
    monkeypatch.setattr(torch, "__version__", "2.14.0+cu128")
    assert map_cache.cached_map(small(), PROBE, build).model_class == "Build2"
