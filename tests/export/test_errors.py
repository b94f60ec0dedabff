"""Failures are clean: interrupted writes leave nothing loadable, damaged or mismatched files
give one clear error, and the CLI turns each into exit code 2 with one ``error:`` line."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import preset_map
from unet_surgery import apply
from unet_surgery.cli import main
from unet_surgery.errors import CheckpointError, RecipeError, SurgeryError
from unet_surgery.export import load_patch, load_patched, save_patch, save_patched_pretrained
from unet_surgery.export.adapter import TENSORS_FILE
from unet_surgery.loading import LDM_PREFIX
from unet_surgery.ops.rewrite import is_rewritten
from unet_surgery.presets import build_unet, example_inputs

RECIPE = "scalecrafter-sd15-2048x2048-disperse-active"


@functools.cache
def patched_sd15():
    model = build_unet("sd15", size="tiny", device="cpu")
    return apply(model, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True)


def fresh_sd15(seed: int = 0):
    return build_unet("sd15", size="tiny", device="cpu", seed=seed)


def interrupted_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the safetensors writer with one that writes half a file, then fails."""
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)


@pytest.mark.parametrize("writer", ["adapter", "diffusers"])
def test_interrupted_write_leaves_nothing_loadable(writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patch = patched_sd15()
    save = save_patch if writer == "adapter" else save_patched_pretrained
    out = tmp_path / "out"
    interrupted_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save(patch, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial folder left behind
    with pytest.raises(CheckpointError):
        load_patch(fresh_sd15(), out)
    # Interrupting an overwrite keeps the earlier export intact and valid.
    monkeypatch.undo()
    save(patch, out)
    before = sorted(p.name for p in out.iterdir())
    interrupted_writer(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        save(patch, out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before
    load_patch(fresh_sd15(), out, unet_map=preset_map("sd15", "tiny")).remove()


def test_damaged_files_give_one_clear_error(tmp_path: Path) -> None:
    patch = patched_sd15()
    save_patched_pretrained(patch, tmp_path / "p")
    weights = tmp_path / "p" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_patched(tmp_path / "p")
    save_patch(patch, tmp_path / "a")
    tensors = tmp_path / "a" / TENSORS_FILE
    raw = bytearray(tensors.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside the stored transform R
    tensors.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_patch(fresh_sd15(), tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match=r"adapter\.json is missing"):
        load_patch(fresh_sd15(), tmp_path / "b")


def test_fingerprint_and_recipe_mismatches_are_refused(tmp_path: Path) -> None:
    patch = patched_sd15()
    save_patch(patch, tmp_path / "a")
    other = fresh_sd15(seed=1)  # same architecture, different weights
    with pytest.raises(CheckpointError, match="not the base the adapter was made for"):
        load_patch(other, tmp_path / "a")
    sdxl = build_unet("sdxl", size="tiny", device="cpu")  # same class, other architecture
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_patch(sdxl, tmp_path / "a")
    # without the fingerprint check, the recipe's own structure still refuses the other UNet
    with pytest.raises(RecipeError, match=r"was made for sd15 \(4 levels, attention 0-3, image\) at 512x512, not this sdxl "):
        load_patch(sdxl, tmp_path / "a", unet_map=preset_map("sdxl", "tiny"), verify_fingerprint=False)
    assert not any(is_rewritten(m) for m in sdxl.modules())  # nothing left applied
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    meta["version"] = 99
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="version 99 is not one this unet-surgery reads"):
        load_patch(fresh_sd15(), tmp_path / "a")


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error:" in err[0], err
    return err[0]


@pytest.mark.requires_ldm
def test_cli_apply_out_writes_a_patched_folder_and_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ldm = build_unet("ldm_sd15", size="tiny", device="cpu")
    checkpoint = tmp_path / "tiny-sd15.safetensors"
    safetensors.torch.save_file({LDM_PREFIX + k: v.contiguous() for k, v in ldm.state_dict().items()}, str(checkpoint))
    assert main(["apply", "--recipe", RECIPE, "--force", "--out", str(tmp_path / "out"), "--quiet", str(checkpoint)]) == 0
    model, patch = load_patched(tmp_path / "out", unet_map=preset_map("sd15", "tiny"))
    reference = fresh_sd15()
    reference.load_state_dict(model.state_dict())
    with apply(reference, RECIPE, unet_map=preset_map("sd15", "tiny"), force=True):
        inputs = example_inputs(reference, height=128, width=128)
        with torch.no_grad():
            assert torch.equal(model(**inputs).sample, reference(**inputs).sample)
    capsys.readouterr()
    junk = tmp_path / "junk.safetensors"
    safetensors.torch.save_file({"encoder.weight": torch.zeros(2)}, str(junk))
    assert "unknown checkpoint layout" in one_error_line(capsys, ["export", "-f", "adapter", "-r", RECIPE, "-o", str(tmp_path / "x"), str(junk)])
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    assert "not a valid safetensors" in one_error_line(capsys, ["export", "-f", "pt2", "-r", RECIPE, "-o", str(tmp_path / "x"), str(truncated)])
    assert "is a preset" in one_error_line(capsys, ["apply", "-r", RECIPE, "--out", str(tmp_path / "x"), "sd15"])
    assert "WIDTHxHEIGHT" in one_error_line(capsys, ["export", "-f", "pt2", "-r", RECIPE, "--force", "--resolution", "big", "-o", str(tmp_path / "x"), str(checkpoint)])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SurgeryError, match="not an unet-surgery export"):
        save_patch(patch, tmp_path)  # a non-empty folder of other files is never overwritten
