"""Mapping is read-only, falls back to the hook probe, and fails with one clear message."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import preset_map
from unet_surgery import MappingError
from unet_surgery.cli import main
from unet_surgery.graph import UNetMap, map_unet
from unet_surgery.presets import build_unet, example_inputs


def test_mapping_never_changes_the_model(tiny_sd15: nn.Module) -> None:
    inputs = example_inputs(tiny_sd15)
    before_state = {k: v.clone() for k, v in tiny_sd15.state_dict().items()}
    with torch.no_grad():
        before = tiny_sd15(**inputs).sample
    map_unet(tiny_sd15)
    with torch.no_grad():
        after = tiny_sd15(**inputs).sample
    assert torch.equal(before, after)
    state = tiny_sd15.state_dict()
    assert state.keys() == before_state.keys()
    assert all(torch.equal(state[k], before_state[k]) for k in state)
    assert not tiny_sd15.training


def test_probe_agrees_with_export_on_levels_and_attention_roles() -> None:
    exported = preset_map("sd15", "tiny")
    probed = map_unet(build_unet("sd15", size="tiny", device="cpu"), method="probe")
    assert probed.method == "probe"
    assert [(c.path, c.level, c.kernel) for c in probed.convs] == [
        (c.path, c.level, c.kernel) for c in exported.convs
    ]
    assert [(a.path, a.kind, a.level) for a in probed.attentions] == [
        (a.path, a.kind, a.level) for a in exported.attentions
    ]
    assert "ConvRecord.stage" in probed.unknown_fields and "skips" in probed.unknown_fields
    assert all(c.stage is None for c in probed.convs)


def test_map_round_trips_through_json() -> None:
    unet_map = preset_map("sd15", "tiny")
    again = UNetMap.from_dict(json.loads(unet_map.to_json()))
    assert again == unet_map


class ConvStack(nn.Module):
    """A CNN without skip connections: convolutions, but no UNet."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(sample)))


def test_a_module_that_is_not_a_unet_is_refused() -> None:
    with pytest.raises(MappingError, match="not a UNet: its graph has no skip-connection"):
        map_unet(ConvStack(), inputs={"sample": torch.zeros(1, 4, 32, 32)})
    with pytest.raises(MappingError, match="don't know how to call ConvStack"):
        map_unet(ConvStack())
    with pytest.raises(MappingError, match=r"expected a torch\.nn\.Module"):
        map_unet("sd15")  # type: ignore[arg-type]


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the probe input has the wrong number of frames")


def test_a_forward_that_fails_is_reported_with_its_cause() -> None:
    with pytest.raises(MappingError) as info:
        map_unet(Broken(), inputs={"sample": torch.zeros(1, 4, 32, 32)})
    message = str(info.value)
    assert "could not map Broken" in message
    assert "the probe input has the wrong number of frames" in message


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_json_for_a_diffusers_folder(tmp_path, capsys) -> None:
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(tmp_path / "unet")
    code, out, err = cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["source"]["kind"] == "diffusers-folder"
    assert data["model_class"] == "UNet2DConditionModel"
    assert data["num_levels"] == 4
    assert [row["level"] for row in data["levels"]] == [0, 1, 2, 3]


@pytest.mark.requires_ldm
def test_inspect_recognises_a_single_file_ldm_checkpoint(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from unet_surgery.presets import build_unet

    prefix = "model.diffusion_model."
    unet = build_unet("ldm_sd21", size="tiny", device="cpu")
    save_file({prefix + k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "model.safetensors"))
    code, out, err = cli(capsys, "inspect", str(tmp_path / "model.safetensors"))
    assert code == 0, err
    assert "source: sd21 (tiny) (ldm layout)" in out, out
    # a file that only looks like one (two keys of the layout) is refused in one line, not mapped
    save_file({prefix + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(tmp_path / "part.safetensors"))
    code, out, err = cli(capsys, "inspect", str(tmp_path / "part.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "fit no shipped architecture" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["inspect", "sdx"], "unknown preset 'sdx'. Did you mean 'sdxl'?"),
        (["inspect", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    ],
)
def test_inspect_bad_input_is_one_error_line(capsys, argv, expected) -> None:
    code, _out, err = cli(capsys, *argv)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_inspect_corrupt_checkpoint(tmp_path, capsys) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = cli(capsys, "inspect", str(bad))
    assert code == 2 and "is not a valid safetensors file" in err
    pickle_like = tmp_path / "model.ckpt"
    pickle_like.write_bytes(b"not a zip")
    code, _, err = cli(capsys, "inspect", str(pickle_like))
    assert code == 2 and "could not be read as a weights-only torch checkpoint" in err
    folder = tmp_path / "folder"
    folder.mkdir()
    code, _, err = cli(capsys, "inspect", str(folder))
    assert code == 2 and "config.json is missing" in err


def test_inspect_unknown_layout(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "vae.safetensors"))
    code, _, err = cli(capsys, "inspect", str(tmp_path / "vae.safetensors"))
    assert code == 2 and "unknown checkpoint layout" in err
