"""``generate --controlnet/--control-image`` and ``--init-image --mask`` on tiny pipeline folders.

Expected values come from the arguments, from ``hashlib`` over the input files and from
HiDiffusion's published rule (the ControlNet acts while ``i < 0.6 * n``,
``controlnet_apply_steps_rate`` of the official ``hidiffusion.py``), never from generate itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.generate.test_inputs import one_error_line
from unet_surgery.cli import main

pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")

# HiDiffusion on the tiny SD1.5 UNet (64 px base): RAU-Net's level-0 downsampler and MSW-MSA
HIDIFFUSION = (
    "name: tiny-hidiffusion\nbase_resolution: [64, 64]\ntarget_resolutions: [[128, 128]]\npasses:\n"
    "  - {type: rau_net, select: {op: [conv2d], stride: [2], stage: [down], level: 0}, switch: 0.4}\n"
    "  - {type: msw_msa, select: {op: [attention], kind: [self], axis: [spatial], level: 0}}\n"
)


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.generation.tiny_pipeline import save_tiny_controlnet

    return save_tiny_controlnet(tmp_path_factory.mktemp("controlnet") / "sd15", "sd15")


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def picture(path: Path, size: int, seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def recorded_calls(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[dict]:
    """The keyword arguments of every ``cls.__call__`` (the pipeline) made during the test."""
    calls: list[dict] = []
    original = cls.__call__

    def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({"class": type(self).__name__, **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", call)
    return calls


def controlnet_scales(monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], list[torch.Tensor]]:
    """The conditioning scale and condition image of every ControlNet forward."""
    scales: list[float] = []
    conds: list[torch.Tensor] = []
    forward = diffusers.ControlNetModel.forward

    def counted(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *a, **kw):  # type: ignore[no-untyped-def]
        scales.append(float(conditioning_scale))
        conds.append(controlnet_cond)
        return forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *a, **kw)

    monkeypatch.setattr(diffusers.ControlNetModel, "forward", counted)
    return scales, conds


def settings_of(path: Path) -> tuple[dict, str]:
    with Image.open(path) as image:
        return json.loads(image.text["unet_surgery.settings"]), image.text["parameters"]


def test_controlnet_under_hidiffusion_acts_for_the_published_60_percent(
    sd15_folder: Path, controlnet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text-to-image at 2x with HiDiffusion (RAU-Net halves the features on step 0) and a
    ControlNet: runs, applies the ControlNet on steps i < 0.6 n, and records its inputs."""
    from unet_surgery.export.fingerprint import fingerprint

    recipe = tmp_path / "hidiffusion.yaml"
    recipe.write_text(HIDIFFUSION)
    control = picture(tmp_path / "edges.png", 128, 1)
    scales, conds = controlnet_scales(monkeypatch)
    calls = recorded_calls(monkeypatch, diffusers.StableDiffusionControlNetPipeline)
    out = tmp_path / "out"
    steps = 5
    assert main(["generate", str(sd15_folder), "--size", "128x128", "--prompt", "x", "--steps", str(steps),
                 "--recipe", str(recipe), "--controlnet", str(controlnet_folder), "--control-image", str(control),
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert [c["class"] for c in calls] == ["StableDiffusionControlNetPipeline"]
    assert scales == [1.0 if i < 0.6 * steps else 0.0 for i in range(steps)]
    # the condition image reached the ControlNet as is (already at --size), in [0, 1], for both CFG halves
    expected = torch.from_numpy(np.array(Image.open(control))).permute(2, 0, 1).float() / 255
    assert conds[0].shape == (2, 3, 128, 128)
    torch.testing.assert_close(conds[0][1], expected)
    settings, parameters = settings_of(out / "p0000-s000000.png")
    reference = diffusers.ControlNetModel.from_pretrained(str(controlnet_folder), use_safetensors=True)
    assert settings["request"]["controlnet"] == {"fingerprint": fingerprint(reference), "image_sha256": sha256(control),
                                                 "scale": 1.0, "end": 0.6}
    assert "mask" not in settings["request"]
    assert "ControlNet end: 0.6" in parameters and f"Control image hash: {sha256(control)}" in parameters


def test_control_scale_and_end_given_are_obeyed_without_a_recipe(
    sd15_folder: Path, controlnet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = picture(tmp_path / "edges.png", 64, 2)
    scales, _ = controlnet_scales(monkeypatch)
    out = tmp_path / "out"
    assert main(["generate", str(sd15_folder), "--size", "64", "--prompt", "x", "--steps", "4", "--recipe", "none",
                 "--controlnet", str(controlnet_folder), "--control-image", str(control), "--control-scale", "0.5",
                 "--control-end", "0.5", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    # diffusers' control_guidance_end: steps with (i + 1) / n <= end
    assert scales == [0.5, 0.5, 0.0, 0.0]
    request = settings_of(out / "p0000-s000000.png")[0]["request"]
    assert (request["controlnet"]["scale"], request["controlnet"]["end"]) == (0.5, 0.5)


def test_the_automatic_cascade_runs_the_controlnet_at_each_stage(
    sd15_folder: Path, controlnet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--recipe auto`` at 2x is a self-cascade 64 -> 128 px: every stage's ControlNet gets the
    condition image at that stage's size; the recipe document keeps its sampling section."""
    control = picture(tmp_path / "edges.png", 128, 7)
    scales, conds = controlnet_scales(monkeypatch)
    out = tmp_path / "out"
    assert main(["generate", str(sd15_folder), "--size", "128x128", "--prompt", "x", "--steps", "2",
                 "--controlnet", str(controlnet_folder), "--control-image", str(control),
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    sizes = [tuple(c.shape[-2:]) for c in conds]
    assert sizes[:2] == [(64, 64)] * 2 and sizes[2:] and set(sizes[2:]) == {(128, 128)}
    assert set(scales) == {1.0}  # no HiDiffusion pass: the ControlNet acts on every step
    with Image.open(out / "p0000-s000000.png") as image:
        assert "sampling:" in image.text["unet_surgery.recipe"]


def test_inpainting_with_a_controlnet_under_hidiffusion(
    sd15_folder: Path, controlnet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "hidiffusion.yaml"
    recipe.write_text(HIDIFFUSION)
    init = picture(tmp_path / "init.png", 64, 3)
    mask = picture(tmp_path / "mask.png", 64, 4, mode="L")
    control = picture(tmp_path / "edges.png", 128, 5)
    calls = recorded_calls(monkeypatch, diffusers.StableDiffusionControlNetInpaintPipeline)
    out = tmp_path / "out"
    assert main(["generate", str(sd15_folder), "--size", "128x128", "--prompt", "x", "--steps", "3",
                 "--recipe", str(recipe), "--init-image", str(init), "--strength", "1", "--mask", str(mask),
                 "--controlnet", str(controlnet_folder), "--control-image", str(control),
                 "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert len(calls) == 1 and calls[0]["class"] == "StableDiffusionControlNetInpaintPipeline"
    call = calls[0]
    assert call["mask_image"].size == (128, 128) and call["image"].size == (128, 128)
    # the mask is resized by nearest neighbour: its values stay those of the file
    assert set(np.unique(np.asarray(call["mask_image"]))) <= set(np.unique(np.asarray(Image.open(mask))))
    assert np.array_equal(np.asarray(call["control_image"]), np.asarray(Image.open(control)))
    request, parameters = settings_of(out / "p0000-s000000.png")
    assert request["request"]["mask"] == {"sha256": sha256(mask)}
    assert request["request"]["init_image"] == {"sha256": sha256(init), "strength": 1.0}
    assert f"Mask hash: {sha256(mask)}" in parameters


@pytest.mark.parametrize(("extra", "words"), [
    (["--mask", "MASK"], ["--mask", "--init-image"]),
    (["--controlnet", "CONTROLNET"], ["--controlnet", "--control-image"]),
    (["--control-image", "IMAGE"], ["--control-image", "--controlnet"]),
    (["--control-end", "0.5"], ["--control-end", "--controlnet"]),
    (["--controlnet", "CONTROLNET", "--control-image", "IMAGE", "--control-end", "0"], ["--control-end", "(0, 1]"]),
    (["--controlnet", "CONTROLNET", "--control-image", "IMAGE", "--control-scale", "11"], ["--control-scale", "[0, 10]"]),
    (["--controlnet", "CONTROLNET", "--control-image", "NOT_AN_IMAGE"], ["--control-image", "cannot read", "bad.png"]),
    (["--controlnet", "MODEL", "--control-image", "IMAGE"], ["--controlnet", "not a diffusers ControlNet folder"]),
    (["--init-image", "IMAGE", "--mask", "NOT_AN_IMAGE"], ["--mask", "cannot read", "bad.png"]),
])
def test_bad_control_and_mask_options_are_one_line(
    sd15_folder: Path, controlnet_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    extra: list[str], words: list[str],
) -> None:
    image = picture(tmp_path / "image.png", 64, 6)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    names = {"MASK": image, "IMAGE": image, "NOT_AN_IMAGE": bad, "CONTROLNET": controlnet_folder, "MODEL": sd15_folder}
    argv = ["generate", str(sd15_folder), "--size", "64", "--prompt", "x", "--out", str(tmp_path / "out"),
            *[str(names.get(a, a)) for a in extra]]
    line = one_error_line(capsys, argv)
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()
