"""No surprise overwrites (issue 23): ``apply --out``, ``export`` and ``generate`` share one rule.

An existing output with the same content is kept; one with other content is refused unless
``--overwrite``; an output is never the input or inside it (``export M -o M`` used to replace
the input model's weights with an adapter); the generate manifest lists every image of the
folder across runs and is never written over a file generate did not write; exported files
have a plain new file's permissions (0644 under umask 022, not mkstemp's 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from unet_surgery.cli import main

RECIPE = "scalecrafter-sd15-1024x1024"
OTHER = "scalecrafter-sd15-2048x2048-disperse-active"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.presets import build_unet

    folder = tmp_path_factory.mktemp("tiny") / "unet"
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(str(folder))
    return folder


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --- the output is never the input ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["export-adapter", "export-diffusers", "apply"])
def test_an_export_over_its_own_input_is_refused_and_the_input_kept(command: str, tiny_unet: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "patched"  # an export of ours: the folder rule alone would let it be replaced
    assert cli(capsys, "apply", "-q", "--force", "-r", RECIPE, "--out", str(model), str(tiny_unet))[0] == 0
    before = tree(model)
    head = ["apply", "-q", "--force", "-r", OTHER] if command == "apply" else ["export", "-q", "--force", "-f", command.split("-")[1], "-r", OTHER]
    for out, words in [(model, "is the input"), (model / "sub", "is inside the input"), (tmp_path, "holds the input")]:
        code, err = cli(capsys, *head, "-o", str(out), "--overwrite", str(model))
        assert code == 2 and len(err) == 1 and words in err[0], err
    assert tree(model) == before


# --- one rule: same content kept, other content only with --overwrite -----------------------------

def test_apply_out_keeps_the_same_export_refuses_another_recipe_and_overwrite_replaces(
        tiny_unet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], umask_022: None) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "apply", "-q", "--force", "-r", RECIPE, "--out", str(out), str(tiny_unet))[0] == 0
    first = tree(out)
    inode = (out / "diffusion_pytorch_model.safetensors").stat().st_ino
    assert cli(capsys, "apply", "-q", "--force", "-r", RECIPE, "--out", str(out), str(tiny_unet))[0] == 0  # the same: kept
    assert tree(out) == first and (out / "diffusion_pytorch_model.safetensors").stat().st_ino == inode
    code, err = cli(capsys, "apply", "-q", "--force", "-r", OTHER, "--out", str(out), str(tiny_unet))
    assert code == 2 and err == [f"unet-surgery apply: error: {out} holds an earlier export made with another recipe "
                                 f"('{RECIPE}'); refusing to replace it (pass --overwrite, or choose another output)"]
    assert tree(out) == first
    assert cli(capsys, "apply", "-q", "--force", "-r", OTHER, "--out", str(out), "--overwrite", str(tiny_unet))[0] == 0
    assert json.loads((out / "adapter.json").read_text())["recipe"] == OTHER


def test_an_earlier_export_with_other_content_under_the_same_recipe_is_refused(tmp_path: Path) -> None:
    from tests.security.test_export_folders import export_into, manifest_note
    from unet_surgery.errors import SurgeryError
    from unet_surgery.export.staging import export_files, staged_folder

    target = tmp_path / "out"
    export_into(target, {"manifest.json": "1"})
    with pytest.raises(SurgeryError, match="holds an earlier export with other content; refusing to replace it"), \
            staged_folder(target, overwrite=False) as stage:
        (stage / "manifest.json").write_text(json.dumps({"format": "unet-surgery-pt2", "note": "2",
                                                         "export_files": export_files(stage, "manifest.json")}))
    assert manifest_note(target) == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["adapter", "diffusers"])
def test_exported_files_have_a_new_files_permissions(fmt: str, tiny_unet: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str], umask_022: None) -> None:
    out = tmp_path / fmt
    assert cli(capsys, "export", "-q", "--force", "-f", fmt, "-r", RECIPE, "-o", str(out), str(tiny_unet))[0] == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes  # 0o666 & ~0o022
    assert out.stat().st_mode & 0o777 == 0o755


def test_disperse_output_has_a_new_files_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     umask_022: None) -> None:
    assert cli(capsys, "disperse", "-o", str(tmp_path / "r.safetensors"))[0] == 0
    assert (tmp_path / "r.safetensors").stat().st_mode & 0o777 == 0o644


# --- generate: the manifest covers the folder, never replaces a foreign file -------------------------

def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> dict[str, str]:
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return {json.loads(line)["file"]: json.loads(line)["sha256"] for line in lines}


def test_a_rerun_with_new_seeds_keeps_the_earlier_images_in_the_manifest(sd15_folder: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["generate", str(sd15_folder), "--size", "64", "--prompt", "a cat", "--steps", "1", "--recipe", "none",
            "-q", "--threads", "1", "-o", str(out)]
    assert main([*base, "--seed", "0"]) == 0
    assert main([*base, "--seed", "1,2"]) == 0
    images = sorted(p.name for p in out.glob("*.png"))
    assert images == ["p0000-s000000.png", "p0000-s000001.png", "p0000-s000002.png"]
    assert manifest(out) == {name: sha(out / name) for name in images}
    (out / "p0000-s000001.png").unlink()  # an image removed by hand leaves the manifest too
    assert main([*base, "--seed", "2"]) == 0
    assert manifest(out) == {name: sha(out / name) for name in ("p0000-s000000.png", "p0000-s000002.png")}


def test_a_manifest_generate_did_not_write_is_never_replaced(sd15_folder: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"my": "own notes"}\n')
    for extra in ([], ["--overwrite"]):
        code, err = cli(capsys, "generate", str(sd15_folder), "--size", "64", "--prompt", "x", "--steps", "1",
                        "-o", str(out), *extra)
        assert code == 2 and err == [f"unet-surgery generate: error: --out: {out / 'manifest.jsonl'} was not written "
                                     "by generate; move it away (generate never writes over it)"]
    assert (out / "manifest.jsonl").read_text() == '{"my": "own notes"}\n' and sorted(out.iterdir()) == [out / "manifest.jsonl"]


def test_generate_into_its_model_folder_is_refused(sd15_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in sd15_folder.rglob("*"))
    code, err = cli(capsys, "generate", str(sd15_folder), "--size", "64", "--prompt", "x", "-o", str(sd15_folder / "unet"))
    assert code == 2 and len(err) == 1 and "is inside the input" in err[0], err
    assert sorted(p.name for p in sd15_folder.rglob("*")) == before


def test_toy_export_follows_the_one_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the second hostile run: `toy export DIR --toy toy4` over an earlier export of
    `toy` replaced it silently; the same export is kept, another toy's needs --overwrite, and
    the shipped weights the toys come from are never an output."""
    from importlib import resources

    out = tmp_path / "toy-unet"
    assert cli(capsys, "toy", "export", str(out), "--toy", "toy")[0] == 0
    first = tree(out)
    assert cli(capsys, "toy", "export", str(out), "--toy", "toy")[0] == 0  # the same: kept
    assert tree(out) == first
    code, err = cli(capsys, "toy", "export", str(out), "--toy", "toy4")
    assert code == 2 and err == [f"unet-surgery toy export: error: {out} holds an earlier export with other content; "
                                 "refusing to replace it (pass --overwrite, or choose another output)"]
    assert tree(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["toy-unet"]
    assert cli(capsys, "toy", "export", str(out), "--toy", "toy4", "--overwrite")[0] == 0
    assert json.loads((out / "toy.json").read_text())["name"] == "toy4"
    shipped = Path(str(resources.files("unet_surgery.toy.weights")))
    before = tree(shipped)
    code, err = cli(capsys, "toy", "export", str(shipped / "toy"))
    assert code == 2 and err == [f"unet-surgery toy export: error: DIR: {shipped / 'toy'} is inside the input "
                                 f"{shipped}; write the output somewhere else"]
    assert tree(shipped) == before


def test_disperse_follows_the_one_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by the second hostile run: `disperse -o FILE` replaced any file silently."""
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my own weights")
    code, err = cli(capsys, "disperse", "-o", str(mine))
    assert code == 2 and err == [f"unet-surgery disperse: error: --output: {mine} holds a file that is not a "
                                 "dispersion transform; refusing to replace it (pass --overwrite, or choose another output)"]
    assert mine.read_bytes() == b"my own weights"
    out = tmp_path / "R.safetensors"
    assert cli(capsys, "disperse", "-o", str(out))[0] == 0
    first = out.read_bytes()
    assert cli(capsys, "disperse", "-o", str(out))[0] == 0 and out.read_bytes() == first  # the same: kept
    code, err = cli(capsys, "disperse", "--eta", "0.1", "-o", str(out))
    assert code == 2 and "holds another transform" in err[0] and out.read_bytes() == first
    assert cli(capsys, "disperse", "--eta", "0.1", "--overwrite", "-o", str(out))[0] == 0 and out.read_bytes() != first
