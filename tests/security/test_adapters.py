"""Tampered adapters are refused: the file list is required and hashed, names are plain,
layer lists, versions and enums are checked, and the base fingerprint covers every weight.

Each tampering below is one the red-team pass saw accepted. Where a test recomputes the
manifest digest it plays an attacker who knows the format: the field check must still hold.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.errors import CheckpointError
from unet_surgery.export import load_patch, save_patch
from unet_surgery.export.manifest import manifest_digest
from unet_surgery.loading import load_unet
from unet_surgery.ops.rewrite import is_rewritten
from unet_surgery.presets import build_unet, example_inputs

RECIPE = "scalecrafter-sd15-2048x2048-disperse-active"


@functools.cache
def saved(root: str) -> Path:
    model = build_unet("sd15", size="tiny", device="cpu")
    patch = apply(model, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True)
    folder = Path(root) / "adapter"
    save_patch(patch, folder)
    patch.remove()
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved(str(tmp_path_factory.mktemp("a")))


def tampered(adapter: Path, tmp_path: Path, change: Any, *, redigest: bool) -> Path:
    folder = tmp_path / "t"
    folder.mkdir()
    for file in adapter.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    meta = json.loads((folder / "adapter.json").read_text())
    change(meta)
    if redigest:
        meta["manifest_sha256"] = manifest_digest(meta)
    (folder / "adapter.json").write_text(json.dumps(meta))
    return folder


def fresh() -> torch.nn.Module:
    return build_unet("sd15", size="tiny", device="cpu")


def load(folder: Path) -> None:
    """Load onto a fresh base; whether it loads or is refused, nothing stays applied."""
    model = fresh()
    try:
        load_patch(model, folder, unet_map=preset_map("sd15", "tiny")).remove()
    finally:
        assert not any(is_rewritten(m) for m in model.modules())


def trim(meta: dict[str, Any]) -> None:
    group = next(g for g, paths in meta["layers"].items() if len(paths) > 1)
    meta["layers"][group] = meta["layers"][group][:-1]


TAMPERING = {
    "files list deleted": (lambda m: m.pop("files"), "files"),
    "path traversal in files": (lambda m: m["files"].update({"../../../../etc/hostname": "0" * 64}), "files"),
    "traversal replacing a name": (
        lambda m: m.update(files={"../recipe.yaml": m["files"]["recipe.yaml"], "adapter.safetensors": m["files"]["adapter.safetensors"]}),
        "files"),
    "layers trimmed": (trim, "selects other layers"),
    "version -7": (lambda m: m.update(version=-7), "version"),
    "dtype evil": (lambda m: m.update(dtype="evil"), "dtype"),
    "num_train_timesteps 0": (lambda m: m.update(num_train_timesteps=0), "num_train_timesteps"),
    "num_train_timesteps as text": (lambda m: m.update(num_train_timesteps="1000"), "num_train_timesteps"),
    "layers of the wrong type": (lambda m: m.update(layers=["a"]), "layers"),
    "fingerprint not a hash": (lambda m: m.update(fingerprint=123), "fingerprint"),
    "filtered missing": (lambda m: m.pop("filtered"), "filtered"),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_tampered_manifest_is_refused_even_with_a_recomputed_digest(kind: str, adapter: Path, tmp_path: Path) -> None:
    change, field = TAMPERING[kind]
    with pytest.raises(CheckpointError, match=field):
        load(tampered(adapter, tmp_path, change, redigest=True))


def test_an_edited_manifest_without_the_digest_is_refused(adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="manifest_sha256"):
        load(tampered(adapter, tmp_path, trim, redigest=False))


def test_an_edited_recipe_is_refused_by_its_hash(adapter: Path, tmp_path: Path) -> None:
    folder = tampered(adapter, tmp_path, lambda m: None, redigest=False)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(": 4", ": 9", 1))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load(folder)


def test_an_untampered_adapter_loads_and_runs_as_the_saved_patch(adapter: Path) -> None:
    """The loaded patch is the applied recipe: same layers, same output as applying it directly."""
    inputs = example_inputs(fresh(), height=128, width=128)
    inputs["timestep"] = torch.tensor([999])
    direct_model = fresh()
    with apply(direct_model, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True) as direct, torch.no_grad():
        expected, layers = direct_model(**inputs).sample, sorted(direct.plan.layers)
    model = fresh()
    with load_patch(model, adapter, unet_map=preset_map("sd15", "tiny")) as loaded, torch.no_grad():
        assert sorted(loaded.plan.layers) == layers and loaded.recipe.name == RECIPE
        out = model(**inputs).sample
    with torch.no_grad():
        plain = model(**inputs).sample
    assert torch.equal(out, expected) and not torch.equal(out, plain)
    assert not any(is_rewritten(m) for m in model.modules())


def test_a_weight_edit_anywhere_changes_the_fingerprint(adapter: Path) -> None:
    model = fresh()
    weight = max(model.parameters(), key=lambda p: p.numel())
    with torch.no_grad():  # index 1 of a large tensor: not among the 64 evenly spaced samples of v1
        weight.view(-1)[1] += 0.5
    with pytest.raises(CheckpointError, match="not the base the adapter was made for"):
        load_patch(model, adapter, unet_map=preset_map("sd15", "tiny"))
    assert not any(is_rewritten(m) for m in model.modules())


@pytest.mark.parametrize("kind", ["nan", "inf", "int8", "bool"])
def test_non_finite_and_non_float_weights_are_refused_on_load(kind: str, tmp_path: Path) -> None:
    model = fresh()
    model.save_pretrained(str(tmp_path / "u"))
    file = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(file))
    key = sorted(state)[0]
    value = state[key].clone()
    if kind in ("nan", "inf"):
        value.view(-1)[0] = float(kind)
    else:
        value = value.to(getattr(torch, kind))
    state[key] = value
    save_file(state, str(file))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_unet(tmp_path / "u")


@pytest.mark.parametrize(
    "text",
    ['{"version": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000, "\xff\xfe", "[]", '{"format": "unet-surgery-adapter"}'],
    ids=["5000-digit version", "deep nesting", "not UTF-8", "not an object", "bare format"],
)
def test_malformed_adapter_json_is_one_error(text: str, adapter: Path, tmp_path: Path) -> None:
    folder = tampered(adapter, tmp_path, lambda m: None, redigest=False)
    (folder / "adapter.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert "\n" not in str(info.value)
