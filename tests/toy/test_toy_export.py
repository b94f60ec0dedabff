"""``unet-surgery toy export`` / ``export_toy``: the toy as a standard diffusers UNet folder.

The folder must be what any diffusers tool loads (``from_pretrained``) and what unet-surgery
loads (``load_unet``), give the in-memory UNet's outputs bit for bit, and sample again through
``load_toy_folder``; writing follows the other exporters (atomic, never over a foreign folder).
"""

from __future__ import annotations

import json

import pytest
import torch

from unet_surgery.cli import main
from unet_surgery.errors import CheckpointError
from unet_surgery.loading import load_unet
from unet_surgery.toy import export_toy, is_toy_export, load_toy, load_toy_folder, sample
from unet_surgery.toy.export import CLASS_EMBEDDING_FILE, TOY_FILE
from unet_surgery.toy.model import TOY_NAMES

pytest.importorskip("diffusers")

FILES = ("config.json", "diffusion_pytorch_model.safetensors", CLASS_EMBEDDING_FILE, TOY_FILE)


@pytest.fixture(scope="module", params=TOY_NAMES)
def exported(request, tmp_path_factory):
    """(in-memory toy, its export folder): one load per toy, so a weights refresh cannot split them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    toy = load_toy(request.param)
    folder = tmp_path_factory.mktemp(f"export-{request.param}") / "toy-unet"
    assert export_toy(toy, folder) == folder
    yield toy, folder
    torch.set_num_threads(threads)


def _probe(toy, height: int = 32, width: int = 32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, height, width, generator=generator)
    context = toy.encode(torch.tensor([0, toy.empty_class]))
    return x, torch.tensor([999, 417]), context


def test_folder_is_a_diffusers_unet_folder(exported):
    toy, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert is_toy_export(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    meta = json.loads((folder / TOY_FILE).read_text())
    assert meta["name"] == toy.name
    assert meta["num_classes"] == toy.num_classes and meta["empty_class"] == toy.empty_class
    assert meta["vae_scale_factor"] == 1 and meta["base_resolution"] == [32, 32]
    assert meta["scheduler"] == toy.scheduler_config
    assert meta["class_embedding"]["shape"] == list(toy.class_embedding.weight.shape)


def test_loads_bit_identical_with_diffusers_and_load_unet(exported):
    from diffusers import UNet2DConditionModel

    toy, folder = exported
    x, t, context = _probe(toy)
    with torch.no_grad():
        want = toy.unet(x, t, encoder_hidden_states=context).sample
        for unet in (UNet2DConditionModel.from_pretrained(folder).eval(), load_unet(folder).eval()):
            assert type(unet) is UNet2DConditionModel
            assert unet.dtype == torch.float32
            got = unet(x, t, encoder_hidden_states=context).sample
            assert torch.equal(got, want)


def test_load_toy_folder_samples_like_the_shipped_toy(exported):
    toy, folder = exported
    loaded = load_toy_folder(folder)
    assert not loaded.training and loaded.name == toy.name
    assert torch.equal(loaded.class_embedding.weight, toy.class_embedding.weight)
    assert loaded.scheduler_config == toy.scheduler_config
    kwargs = {"seeds": [7], "steps": 3}
    assert torch.equal(sample(loaded, [1], **kwargs), sample(toy, [1], **kwargs))


def test_cli_export_writes_and_replaces_its_own_folder(tmp_path, capsys):
    name = TOY_NAMES[0]
    out = tmp_path / "toy-unet"
    assert main(["toy", "export", str(out), "--toy", name]) == 0
    assert "unet-surgery inspect" in capsys.readouterr().out
    assert sorted(json.loads((out / TOY_FILE).read_text())["export_files"]) == sorted(FILES)
    # an earlier toy export holding exactly its own files is replaced as a whole (atomically)
    assert main(["toy", "export", str(out), "--toy", name]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-unet"]
    assert json.loads((out / TOY_FILE).read_text())["name"] == name
    # a file the user added to it is never deleted: the export is refused instead
    (out / "notes.txt").write_text("added after the export")
    capsys.readouterr()
    assert main(["toy", "export", str(out), "--toy", name]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "added after the export"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "notes.txt"])


def test_cli_refuses_a_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["toy", "export", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unet-surgery toy export: error: ")
    assert "refusing to overwrite" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


def test_cli_bad_toy_name_is_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["toy", "export", str(out), "--toy", "sd15"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "unknown toy 'sd15'" in captured.err and ", ".join(TOY_NAMES) in captured.err
    assert not out.exists()


def test_failed_write_keeps_the_earlier_export(tmp_path, monkeypatch):
    import safetensors.torch

    toy = load_toy(TOY_NAMES[0])
    out = tmp_path / "toy-unet"
    export_toy(toy, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_toy(toy, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy-unet"]


def test_load_toy_folder_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not a toy export"):
        load_toy_folder(tmp_path)
