"""Every file the tool reads is bounded before it is parsed or decoded (issue 23).

The hostile files are built here: JSON nested 100 000 deep or holding a 5000-digit integer or
NaN, YAML base-60 numbers, a FIFO, a PNG whose hand-written header claims 20000x20000, a
``.ckpt`` whose storages are deflated, float8 weights, a shard index naming a file outside its
folder. Each case asserts the exact refusal, or the exact result. Bounded time is shown by
construction: the refusal names a check that runs before the parser or decoder (depth counted
before ``json.loads``, digits counted before ``int``, the PNG's size read before its pixels,
whose data here is garbage a decoder would fail on with another message).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from unet_surgery.cli import main
from unet_surgery.errors import CheckpointError, RecipeError, SurgeryError
from unet_surgery.io import MAX_INT_DIGITS, MAX_JSON_DEPTH, parse_bounded_json, read_bounded_json
from unet_surgery.loading import load_unet
from unet_surgery.loading.weights import load_state_dict
from unet_surgery.recipes.library import RecipeLoader, dump_recipe, list_recipes, load_recipe


def cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.presets import build_unet

    folder = tmp_path_factory.mktemp("tiny") / "unet"
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(str(folder))
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "unet"
    shutil.copytree(saved, folder)
    return folder


# --- one bounded JSON reader ----------------------------------------------------------------------

DEEP = 100_000
DIGITS = 5000
HOSTILE_JSON: dict[str, tuple[str, str]] = {
    # name: (document, the refusal it must get, after the file name)
    "deep nesting": ('{"a": ' + "[" * DEEP + "]" * DEEP + "}", f"is nested {DEEP + 1} levels deep (limit {MAX_JSON_DEPTH})"),
    "5000-digit integer": ('{"a": ' + "9" * DIGITS + "}", f"holds an integer of {DIGITS} digits (limit {MAX_INT_DIGITS})"),
    "NaN": ('{"norm_eps": NaN}', "holds NaN, which is not a JSON number (only finite numbers are accepted)"),
    "Infinity": ('{"a": -Infinity}', "holds -Infinity, which is not a JSON number (only finite numbers are accepted)"),
    "overflowing float": ('{"a": 1e999}', "holds the number '1e999', which overflows to infinity"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_JSON))
def test_the_bounded_reader_refuses_before_converting(kind: str, tmp_path: Path) -> None:
    document, refusal = HOSTILE_JSON[kind]
    file = tmp_path / "x.json"
    file.write_text(document)
    with pytest.raises(SurgeryError) as info:
        read_bounded_json(file, SurgeryError)
    assert str(info.value) == f"{file} {refusal}"
    assert "9" * 50 not in str(info.value)  # an integer is never printed whole


def test_strings_holding_brackets_do_not_count_as_depth() -> None:
    text = json.dumps({"a": "[" * 1000 + '\\"{' * 500, "b": [[1]]})
    assert parse_bounded_json(text, "x", SurgeryError) == json.loads(text)


JSON_READERS: dict[str, Callable[[Path, Path], Any]] = {}


def reader(name: str) -> Callable[[Callable[[Path, Path], Any]], Callable[[Path, Path], Any]]:
    def register(fn: Callable[[Path, Path], Any]) -> Callable[[Path, Path], Any]:
        JSON_READERS[name] = fn
        return fn
    return register


@reader("config.json")
def _config(folder: Path, tmp_path: Path) -> Path:
    return folder / "config.json"


@reader("shard index")
def _index(folder: Path, tmp_path: Path) -> Path:
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model-00001-of-00001.safetensors")
    return folder / "diffusion_pytorch_model.safetensors.index.json"


@pytest.mark.parametrize("kind", ["deep nesting", "5000-digit integer", "NaN"])
@pytest.mark.parametrize("name", list(JSON_READERS))
def test_inspect_refuses_hostile_json_in_one_line(name: str, kind: str, saved_tiny: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_of(saved_tiny, tmp_path)
    file = JSON_READERS[name](folder, tmp_path)
    file.write_text(HOSTILE_JSON[kind][0])
    code, err = cli("inspect", str(folder), capsys=capsys)
    assert code == 2 and err == [f"unet-surgery inspect: error: {file} {HOSTILE_JSON[kind][1]}"]


def test_norm_eps_nan_is_refused_where_it_was_accepted(saved_tiny: Path, tmp_path: Path) -> None:
    folder = copy_of(saved_tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["norm_eps"] = float("nan")
    (folder / "config.json").write_text(json.dumps(config))  # Python writes NaN, as the red team did
    with pytest.raises(CheckpointError, match=r"config\.json holds NaN"):
        load_unet(folder)


def test_model_index_and_component_configs_are_read_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pipe"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("[" * DEEP + "]" * DEEP)
    code, err = cli("generate", str(folder), "--size", "64", "--prompt", "x", "-o", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and err == [f"unet-surgery generate: error: MODEL: {folder / 'model_index.json'} "
                                 f"is nested {DEEP} levels deep (limit {MAX_JSON_DEPTH})"]
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "vae" / "config.json").write_text('{"norm_eps": NaN}')
    code, err = cli("generate", str(folder), "--size", "64", "--prompt", "x", "-o", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and err == [f"unet-surgery generate: error: MODEL: {folder / 'vae' / 'config.json'} "
                                 "holds NaN, which is not a JSON number (only finite numbers are accepted)"]


def test_png_settings_are_read_bounded(tmp_path: Path) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from unet_surgery.generation import pngmeta

    info = PngInfo()
    info.add_itxt(pngmeta.SETTINGS_KEY, '{"format": "unet-surgery-generate/1", "request": ' + "[" * DEEP + "]" * DEEP + "}")
    Image.new("RGB", (8, 8)).save(tmp_path / "p0000-s000000.png", pnginfo=info)
    assert pngmeta.read_settings(tmp_path / "p0000-s000000.png") is None  # not ours: never parsed


def test_pt2_model_json_is_read_bounded(tmp_path: Path) -> None:
    from tests.security.test_pt2_payloads import program_bytes, rewrite
    from unet_surgery.export.pt2_safety import check_archive

    path = tmp_path / "phase_0.pt2"
    path.write_bytes(rewrite(program_bytes(), {"models/model.json": ("[" * DEEP + "]" * DEEP).encode()}))
    with pytest.raises(CheckpointError, match=rf"model\.json is nested {DEEP} levels deep \(limit {MAX_JSON_DEPTH}\)"):
        check_archive(path)


def test_a_recipe_in_json_is_read_bounded(tmp_path: Path) -> None:
    file = tmp_path / "r.json"
    file.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(RecipeError, match=f"is nested {DEEP} levels deep"):
        load_recipe(file)


@pytest.mark.parametrize("kind", ["deep nesting", "5000-digit integer", "over the size limit", "FIFO"])
def test_a_hostile_map_cache_entry_is_ignored_and_rebuilt(kind: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The map cache reads its entries through the bounded reader: an entry planted in the user
    cache under the right key is never parsed unbounded (a RecursionError, or a wait on a FIFO,
    before); it is ignored, the map built again and a regular entry repaired."""
    from unet_surgery.graph import cache
    from unet_surgery.graph.records import UNetMap

    monkeypatch.setenv("UNET_SURGERY_CACHE", str(tmp_path))
    monkeypatch.delenv("UNET_SURGERY_NO_MAP_CACHE", raising=False)
    cache.clear_memory()
    model, probe = torch.nn.Conv2d(4, 4, 3), {"latent_hw": [8, 8]}
    built = UNetMap(model_class="Conv2d", method="export", convs=[], attentions=[], skips=[], num_levels=1,
                    probe_latent=(1, 4, 8, 8))
    entry = tmp_path / "maps" / f"{cache.map_key(model, probe)}.json"
    entry.parent.mkdir(parents=True)
    if kind == "FIFO":
        os.mkfifo(entry)
    elif kind == "over the size limit":  # a valid entry of another map, padded past the bound
        other = UNetMap(model_class="Planted", method="export", convs=[], attentions=[], skips=[], num_levels=1,
                        probe_latent=(1, 4, 8, 8)).to_json()
        entry.write_text(other + " " * (cache.MAX_MAP_BYTES + 1 - len(other)))
    else:
        entry.write_text(HOSTILE_JSON[kind][0])
    found: list[UNetMap] = []
    worker = threading.Thread(target=lambda: found.append(cache.cached_map(model, probe, lambda: built)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # release the reader blocked on the FIFO, then fail
        os.close(os.open(entry, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the lookup waited on a FIFO")
    cache.clear_memory()
    assert found and found[0].to_dict() == built.to_dict()  # built again, not read from the entry
    if kind != "FIFO":  # a regular file is replaced by the rebuilt entry
        assert json.loads(entry.read_text()) == built.to_dict()


# --- a shard index names files inside its folder ---------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_index_may_not_name_a_file_outside_the_folder(name: str, saved_tiny: Path, tmp_path: Path) -> None:
    folder = copy_of(saved_tiny, tmp_path)
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "outside.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": name}}))
    with pytest.raises(CheckpointError, match="which is not a file name inside"):
        load_unet(folder)


# --- YAML without base-60 numbers -------------------------------------------------------------------

def test_yaml_base_60_stays_a_string_and_is_never_converted() -> None:
    assert yaml.safe_load("a: 59:59") == {"a": 3599}  # YAML 1.1, what PyYAML's SafeLoader does
    assert yaml.load("a: 59:59", Loader=RecipeLoader) == {"a": "59:59"}
    long = ":".join(["59"] * 100_000)  # quadratic to convert; a string here, so never converted
    assert yaml.load(f"a: {long}", Loader=RecipeLoader) == {"a": long}


@pytest.mark.parametrize(("text", "value"), [("1e5", 100000.0), ("0o17", 15), ("0x1F", 31), ("-12", -12), ("1_000", "1_000"),
                                             ("0b11", "0b11"), (".5", 0.5), ("+1.5e-3", 0.0015)])
def test_yaml_numbers_follow_the_1_2_core_schema(text: str, value: Any) -> None:
    assert yaml.load(f"a: {text}", Loader=RecipeLoader) == {"a": value}


def test_a_base_60_factor_is_one_recipe_error(tmp_path: Path) -> None:
    from tests.security.test_hostile_inputs import good

    file = tmp_path / "r.yaml"
    file.write_text(good(factor=":".join(["59"] * 1000)))  # a string to the loader, so not a number
    with pytest.raises(RecipeError, match=r"passes\[0\]\.factor: expected"):
        load_recipe(file)
    file.write_text(good(factor="9" * DIGITS))
    with pytest.raises(RecipeError, match=f"an integer of {DIGITS} digits"):
        load_recipe(file)


def test_shipped_recipes_round_trip_through_the_1_2_loader() -> None:
    for name in list_recipes():
        recipe = load_recipe(name)
        assert load_recipe(yaml.load(dump_recipe(recipe), Loader=RecipeLoader)) == recipe, name
    assert dump_recipe({"a": "1e5", "b": "59:59"}) == "a: '1e5'\nb: 59:59\n"  # quoted where 1.2 reads a number


# --- no blocking on special files ----------------------------------------------------------------

def finishes(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it ended with. A thread still blocked after a minute
    fails the test (a guard against hanging the suite, not a timing assertion)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "blocked on a FIFO"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unet_surgery.generation.jobs import read_prompts
    from unet_surgery.generation.run import _open_init_image

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for fn in (lambda: read_prompts(fifo), lambda: load_recipe(fifo), lambda: _open_init_image(fifo),
               lambda: read_bounded_json(fifo, SurgeryError)):
        error = finishes(fn)
        assert isinstance(error, SurgeryError) and str(error).endswith(f"{fifo} is a FIFO, not a regular file"), error


# --- image headers bounded before decoding --------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, followed by a few garbage bytes of
    IDAT: decoding it would fail (or take gigabytes); only a check of the header refuses it first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_an_init_image_claiming_20000x20000_is_refused_before_decoding(tmp_path: Path) -> None:
    from unet_surgery.generation.jobs import GenerationError
    from unet_surgery.generation.run import _open_init_image

    file = tmp_path / "big.png"
    for side in (9000, 20000):  # under PIL's own bomb check (2 x 89 M pixels), and over it
        file.write_bytes(png_claiming(side, side))
        with pytest.raises(GenerationError) as info:
            _open_init_image(file)
        assert str(info.value) == f"--init-image: {file} claims {side}x{side} pixels, more than the limit of 67108864 (8192x8192)"
    file.write_bytes(png_claiming(64, 64))  # the same garbage under the limit reaches the decoder
    with pytest.raises(GenerationError, match="cannot read"):
        _open_init_image(file)


@pytest.mark.parametrize(("option", "mode"), [("--mask", "L"), ("--control-image", "RGB")])
def test_a_mask_or_control_image_claiming_20000x20000_is_refused_before_decoding(tmp_path: Path, option: str,
                                                                                 mode: str) -> None:
    from unet_surgery.generation.jobs import GenerationError
    from unet_surgery.generation.run import _open_image

    file = tmp_path / "big.png"
    file.write_bytes(png_claiming(20000, 20000))
    with pytest.raises(GenerationError) as info:
        _open_image(file, option, mode)
    assert str(info.value) == f"{option}: {file} claims 20000x20000 pixels, more than the limit of 67108864 (8192x8192)"


def test_a_png_in_the_output_claiming_20000x20000_is_not_decoded(tmp_path: Path) -> None:
    from unet_surgery.generation import pngmeta

    (tmp_path / "p0000-s000000.png").write_bytes(png_claiming(20000, 20000))
    assert pngmeta.read_settings(tmp_path / "p0000-s000000.png") is None


# --- checkpoints: deflated zip entries, float8 -------------------------------------------------------

def deflated_copy(path: Path, out: Path) -> None:
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)


def test_a_ckpt_with_deflated_storages_loads_the_right_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {"a": torch.randn(64, 64), "b": torch.randn(3, 5, 7)}
    torch.save(state, tmp_path / "plain.ckpt")
    deflated_copy(tmp_path / "plain.ckpt", tmp_path / "deflated.ckpt")
    with zipfile.ZipFile(tmp_path / "deflated.ckpt") as archive:  # the file really is deflated
        assert any(i.compress_type == zipfile.ZIP_DEFLATED and i.filename.rsplit("/", 1)[-1].isdigit()
                   for i in archive.infolist())
    loaded = load_state_dict(tmp_path / "deflated.ckpt")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_deflated_zip_bomb_entry_is_refused(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1 << 20)}, tmp_path / "zeros.ckpt")  # 4 MiB of zeros deflate ~1000:1
    deflated_copy(tmp_path / "zeros.ckpt", tmp_path / "bomb.ckpt")
    with pytest.raises(CheckpointError, match="refusing a zip bomb"):
        load_state_dict(tmp_path / "bomb.ckpt")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_one_clear_error(dtype: torch.dtype, saved_tiny: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = copy_of(saved_tiny, tmp_path)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    key = sorted(state)[0]
    state[key] = state[key].to(dtype)
    save_file(state, str(file))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"{key} holds {name} values \(floating point\); UNet weights must be"):
        load_unet(folder)
