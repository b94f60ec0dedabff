"""``unet-surgery generate`` on tiny pipeline folders: settings in the PNGs, one vs two processes,
resume after a kill, single-file checkpoints.

Expected values come from the arguments given (prompts, seeds, sizes, steps), from the shipped
recipe file read independently with ``yaml.safe_load``, from the installed package versions and
from ``hashlib`` over the written bytes, never from the generate code itself.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.generate.conftest import REPOSITORY, accelerate_command, clean_env, generate_command, run
from unet_surgery.cli import main

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")

PROMPTS = ["a red cube on a table", "ein Haus am See, ☃"]


def expected_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}-s{seed:06d}.png"


def settings_of(path: Path) -> tuple[dict, str, str]:
    with Image.open(path) as image:
        text = dict(image.text)
    return json.loads(text["unet_surgery.settings"]), text["unet_surgery.recipe"], text["parameters"]


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import PIL
    import transformers

    import unet_surgery

    return {"unet_surgery": unet_surgery.__version__, "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "pillow": PIL.__version__}


def check_run(out: Path, prompts: list[str], seeds: list[int], width: int, height: int, steps: int,
              guidance: float, negative: str) -> list[Path]:
    """Every file named and carrying what was asked; the manifest one line per file, in order."""
    names = [expected_name(i, s) for i in range(len(prompts)) for s in seeds]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    assert not list(out.glob(".*"))  # no temporary file left
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == names
    for line, name in zip(lines, names, strict=True):
        path = out / name
        prompt_index, seed = int(name[1:5]), int(name[7:13])
        settings, _, parameters = settings_of(path)
        request = settings["request"]
        with Image.open(path) as image:
            assert image.size == (width, height) and image.mode == "RGB"
        assert request["prompt"] == prompts[prompt_index] and request["prompt_index"] == prompt_index
        assert request["seed"] == seed
        assert (request["width"], request["height"]) == (width, height)
        assert request["steps"] == steps and request["guidance_scale"] == guidance
        assert request["negative_prompt"] == negative
        assert parameters.splitlines()[0] == prompts[prompt_index]
        assert f"Seed: {seed}" in parameters and f"Size: {width}x{height}" in parameters
        assert {k: settings["environment"]["versions"][k] for k in versions()} == versions()
        assert line["sha256"] == sha256(path) and line["seed"] == seed and line["prompt"] == prompts[prompt_index]
    return [out / n for n in names]


def test_single_process_sd15_auto_recipe_settings_in_png(sd15_folder: Path, tmp_path: Path) -> None:
    """Twice the native width with ``--recipe auto``: the self-cascade recipe for 64x128 (H x W)."""
    from unet_surgery.export.fingerprint import fingerprint
    from unet_surgery.loading import load_unet

    out = tmp_path / "out"
    code = main(["generate", str(sd15_folder), "--size", "128x64", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--seed", "3,11", "--steps", "2", "--guidance", "4.5", "--negative", "blurry", "--out", str(out),
                 "--quiet", "--threads", "1"])
    assert code == 0
    files = check_run(out, PROMPTS, [3, 11], 128, 64, 2, 4.5, "blurry")
    settings, document, _ = settings_of(files[0])
    recipe = yaml.safe_load(document)
    assert recipe["target_resolutions"] == [[64, 128]]  # (height, width) of --size 128x64
    assert recipe["base_resolution"] == [64, 64]  # tiny SD1.5: 8x8 latents, VAE factor 8
    assert recipe["sampling"]["stages"][-1] == [64, 128] and recipe["sampling"]["steps"] == 2
    assert settings["request"]["recipe"] == {"name": recipe["name"],
                                              "sha256": "sha256:" + hashlib.sha256(document.encode()).hexdigest()}
    assert settings["request"]["model"]["fingerprint"] == fingerprint(load_unet(sd15_folder / "unet"))
    assert settings["request"]["model"]["pipeline"] == "StableDiffusionPipeline"


def test_single_process_sdxl_shipped_recipe(sdxl_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A shipped recipe by name: the document in the PNG is the shipped file's passes."""
    out = tmp_path / "out"
    code = main(["generate", str(sdxl_folder), "--size", "128x64", "--prompts", str(_prompt_file(tmp_path)),
                 "--recipe", "freeu-sdxl", "--force", "--seed", "5", "--steps", "2", "--out", str(out), "--quiet",
                 "--scheduler", "euler", "--threads", "1"])
    assert code == 0
    files = check_run(out, PROMPTS, [5], 128, 64, 2, 7.5, "")
    shipped = yaml.safe_load((REPOSITORY / "recipes" / "freeu" / "freeu-sdxl.yaml").read_text())
    settings, document, parameters = settings_of(files[0])
    applied = yaml.safe_load(document)
    assert applied["name"] == "freeu-sdxl"
    for ours, theirs in zip(applied["passes"], shipped["passes"], strict=True):
        assert {k: ours[k] for k in ("type", "b1", "b2", "s1", "s2")} == {k: theirs[k] for k in ("type", "b1", "b2", "s1", "s2")}
    assert settings["request"]["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert settings["request"]["model"]["pipeline"] == "StableDiffusionXLPipeline"
    assert "Recipe: freeu-sdxl" in parameters
    # the recipe targets 1024x1024: said once, as a warning line
    assert "warning: recipe 'freeu-sdxl' was written for 1024x1024" in capsys.readouterr().err


def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(f"# two prompts\n{PROMPTS[0]}\n\n{PROMPTS[1]}\n", encoding="utf-8")
    return path


def test_two_processes_give_the_same_bytes(sd15_folder: Path, tmp_path: Path) -> None:
    """``accelerate launch`` with two CPU processes (gloo) against one process: every file, the
    manifest included, byte for byte. Three jobs, so the split is uneven and the third image is
    the second process's first; at 128x64 the automatic recipe (a two-stage self-cascade with
    re-dilation) runs, so the patched UNet and the cascade's own noise draws are covered."""
    from unet_surgery.graph import map_unet
    from unet_surgery.loading import load_unet

    map_unet(load_unet(sd15_folder / "unet"), cache=True)  # the subprocesses read the cached map
    args = ["--size", "128x64", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--prompt", "third",
            "--seed", "7", "--steps", "2", "--quiet", "--threads", "1"]
    one = run(generate_command(str(sd15_folder), *args, "--out", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(accelerate_command(2, str(sd15_folder), *args, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["manifest.jsonl", *(expected_name(i, 7) for i in range(3))]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert settings_of(tmp_path / "two" / expected_name(2, 7))[0]["request"]["recipe"]["name"].startswith("auto-")
    # the manifest was written once, by the main process, which reports for the run
    reports = [line for line in two.stdout.splitlines() if line.startswith("wrote")]
    assert len(reports) == 1 and reports[0].startswith("wrote 2,")  # 3 jobs: blocks of 2 and 1


KILLED_AFTER_THE_FIRST_PNG = """
import sys
from unet_surgery.cli import main
from unet_surgery.generation import pngmeta

write_png = pngmeta.write_png


def write_then_wait(*args, **kwargs):
    digest = write_png(*args, **kwargs)  # the PNG is in place (atomic rename done)
    print("png written", flush=True)
    sys.stdin.read()  # blocks until the test kills this process
    return digest


pngmeta.write_png = write_then_wait
sys.exit(main(["generate", *sys.argv[1:]]))
"""
"""``generate`` in a process that says so on stdout once its first PNG is written and then waits
to be killed: the test kills it at a known point (after exactly one PNG), without polling."""


def test_resume_after_a_killed_run(sd15_folder: Path, tmp_path: Path) -> None:
    """Kill the run once its first PNG exists; the rerun keeps what was written (same inode and
    mtime), removes a writer's leftover temporary file and completes the set."""
    out = tmp_path / "out"
    seeds = list(range(4))
    args = [str(sd15_folder), "--size", "64x64", "--prompt", PROMPTS[0], "--seed", "0-3", "--steps", "20",
            "--guidance", "3", "--out", str(out), "--quiet", "--threads", "1"]
    process = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_THE_FIRST_PNG, *args], env=clean_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(240, process.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    try:
        assert process.stdout is not None
        # blocks until the first PNG is written (or the process ends: EOF)
        lines = iter(process.stdout.readline, "")
        written = next((line for line in lines if line.strip() == "png written"), None)
        process.send_signal(signal.SIGKILL)
    finally:
        watchdog.cancel()
        process.wait(timeout=60)
    assert written is not None, "the run ended without writing a PNG"
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("p*.png")}
    assert len(done) == 1 < len(seeds), "the run must be killed after its first PNG"
    assert not (out / "manifest.jsonl").exists()
    leftover = out / f".{expected_name(0, 3)}.x1y2z3.tmp"  # what a writer killed mid-file leaves
    leftover.write_bytes(b"\x89PNG half")

    assert main(["generate", *args]) == 0
    for name, (inode, mtime, data) in done.items():
        stat = (out / name).stat()
        assert (stat.st_ino, stat.st_mtime_ns, (out / name).read_bytes()) == (inode, mtime, data)
    check_run(out, [PROMPTS[0]], seeds, 64, 64, 20, 3.0, "")


def test_other_settings_in_the_folder_are_refused(sd15_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    base = ["generate", str(sd15_folder), "--size", "64", "--prompt", "x", "--out", str(out), "--quiet", "--threads", "1"]
    assert main([*base, "--steps", "2"]) == 0
    before = (out / expected_name(0, 0)).read_bytes()
    settings, document, parameters = settings_of(out / expected_name(0, 0))
    # --recipe auto (the default) at the native 64x64 (8x8 latents x VAE factor 8): no recipe
    assert settings["request"]["recipe"] is None and document == "" and "Recipe: none" in parameters
    capsys.readouterr()
    assert main([*base, "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unet-surgery generate: error: --out:")
    assert "differing: steps" in err[0] and "--overwrite" in err[0]
    assert (out / expected_name(0, 0)).read_bytes() == before
    assert main([*base, "--steps", "3", "--overwrite"]) == 0
    assert settings_of(out / expected_name(0, 0))[0]["request"]["steps"] == 3


def test_single_file_checkpoint_with_components(sd15_folder: Path, tmp_path: Path) -> None:
    """The UNet as one safetensors file plus the folder for the rest: the same pixels as the folder."""
    from safetensors.torch import save_file

    from unet_surgery.loading import load_unet

    unet = load_unet(sd15_folder / "unet")
    checkpoint = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(checkpoint))
    common = ["--size", "64", "--prompt", "x", "--steps", "2", "--quiet", "--threads", "1"]
    assert main(["generate", str(sd15_folder), *common, "--out", str(tmp_path / "folder")]) == 0
    assert main(["generate", str(checkpoint), "--components", str(sd15_folder), *common,
                 "--out", str(tmp_path / "file")]) == 0
    with Image.open(tmp_path / "folder" / expected_name(0, 0)) as a, Image.open(tmp_path / "file" / expected_name(0, 0)) as b:
        assert a.tobytes() == b.tobytes()
    assert settings_of(tmp_path / "file" / expected_name(0, 0))[0]["request"]["model"] == \
        settings_of(tmp_path / "folder" / expected_name(0, 0))[0]["request"]["model"]


def test_init_image_upscales(sd15_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image-to-image from a 64x64 picture to 128x128: the init image's hash and strength recorded,
    and the strength obeyed: diffusers runs the last ``int(steps * strength)`` steps (2 of 4)."""
    from diffusers import UNet2DConditionModel

    calls = []
    forward = UNet2DConditionModel.forward

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    picture = tmp_path / "small.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    out = tmp_path / "out"
    assert main(["generate", str(sd15_folder), "--size", "128x128", "--prompt", "x", "--steps", "4",
                 "--init-image", str(picture), "--strength", "0.5", "--out", str(out), "--quiet",
                 "--threads", "1"]) == 0
    assert len(calls) == int(4 * 0.5)  # one batched [uncond, cond] call a step
    settings, document, parameters = settings_of(out / expected_name(0, 0))
    assert settings["request"]["init_image"] == {"sha256": sha256(picture), "strength": 0.5}
    assert "sampling" not in yaml.safe_load(document)  # the image replaces the cascade's first stage
    assert "Denoising strength: 0.5" in parameters
    with Image.open(out / expected_name(0, 0)) as image:
        assert image.size == (128, 128)


def test_an_image_depends_only_on_its_prompt_and_seed(sd15_folder: Path, tmp_path: Path) -> None:
    """The same (prompt, seed) in another list, at another position: the same file, byte for byte."""
    common = ["--size", "64", "--steps", "2", "--quiet", "--threads", "1"]
    assert main(["generate", str(sd15_folder), "--prompt", "x", "--prompt", "y", "--seed", "3,11", *common,
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", str(sd15_folder), "--prompt", "x", "--prompt", "y", "--seed", "11", *common,
                 "--out", str(tmp_path / "b")]) == 0
    name = expected_name(1, 11)
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "a" / expected_name(1, 3)).read_bytes()
