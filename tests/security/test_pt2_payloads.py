"""A ``.pt2`` export never runs code it carries: pickles, guard code and odd graph targets are
refused before anything is unpickled or evaluated, and a phase file must match its manifest hash.

The programs are a tiny module exported with ``torch.export`` (the checks look at the archive,
not at what model it holds); each payload opens a marker file when it runs, so "nothing ran"
is checked, not assumed. The first test shows the payload is live: torch's own loader runs it.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from unet_surgery.errors import CheckpointError
from unet_surgery.export.pt2 import MANIFEST, PT2_FORMAT, PT2_VERSION, Pt2Runner


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(sample) * timestep.float().reshape(-1, 1) + encoder_hidden_states.sum()


class Payload:
    """Unpickling this opens (creates) ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.marker), "w"))


def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"sample": torch.randn(1, 4), "timestep": torch.tensor([7]), "encoder_hidden_states": torch.randn(1, 2)}


def program_bytes() -> bytes:
    torch.manual_seed(0)
    ep = torch.export.export(Tiny(), args=(), kwargs=inputs())
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    return buffer.getvalue()


def rewrite(data: bytes, edit: dict[str, bytes | None]) -> bytes:
    """The archive with entries replaced (suffix match), added (full name) or removed (None)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    done: set[str] = set()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            key = next((k for k in edit if info.filename.endswith(k)), None)
            if key is None:
                dst.writestr(info.filename, src.read(info))
                continue
            done.add(key)
            if edit[key] is not None:
                dst.writestr(info.filename, edit[key])
        for key in set(edit) - done:
            if edit[key] is not None:
                dst.writestr(key, edit[key])
    return out.getvalue()


def entry(data: bytes, suffix: str) -> bytes:
    z = zipfile.ZipFile(io.BytesIO(data))
    return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def write_export(folder: Path, program: bytes, *, file: str = "phase_0.pt2", sha: str | None = None) -> Path:
    """A folder laid out as :func:`export_pt2` writes it, manifest hash computed over ``program``
    (the attacker controls both, so a matching hash must not be enough)."""
    folder.mkdir(parents=True, exist_ok=True)
    if "/" not in file and ".." not in file:
        (folder / file).write_bytes(program)
    manifest = {
        "format": PT2_FORMAT, "version": PT2_VERSION, "recipe": "x", "model_class": "Tiny",
        "resolution": [8, 8], "latent_hw": [1, 1], "batch": 1, "dtype": "float32", "num_steps": 1,
        "timesteps": [7.0], "step_phase": [0],
        "phases": [{"file": file, "sha256": sha or hashlib.sha256(program).hexdigest(), "steps": [0], "changed": {}}],
        "inputs": {"sample": {"shape": [1, 4], "dtype": "float32"}, "timestep": {"shape": [1], "dtype": "int64"},
                   "encoder_hidden_states": {"shape": [1, 2], "dtype": "float32"}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_clean_program_loads_and_runs(tmp_path: Path) -> None:
    runner = Pt2Runner(write_export(tmp_path / "ok", program_bytes()))
    torch.manual_seed(0)
    expected = Tiny()(**inputs())
    assert torch.equal(runner(**inputs()), expected)


def test_the_sample_input_payload_is_live_in_torch_s_own_loader(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = rewrite(program_bytes(), {"data/sample_inputs/model.pt": pickle.dumps(Payload(marker), protocol=2)})
    (tmp_path / "p.pt2").write_bytes(bad)
    with contextlib.suppress(Exception):
        torch.export.load(str(tmp_path / "p.pt2"))
    assert marker.exists()  # torch unpickled it: the payload below is a real one


def pickled_weight(data: bytes, payload: bytes) -> bytes:
    config = json.loads(entry(data, "model_weights_config.json"))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    name = config["config"][first]["path_name"]
    return rewrite(data, {"model_weights_config.json": json.dumps(config).encode(), f"data/weights/{name}": payload})


def with_model_json(data: bytes, change: Any, marker: Path) -> bytes:
    model = json.loads(entry(data, "models/model.json"))
    change(model)
    return rewrite(data, {"models/model.json": json.dumps(model).replace("MARKER", str(marker)).encode()})


def retarget(model: dict[str, Any]) -> None:
    model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"


def dunder(model: dict[str, Any]) -> None:
    model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.__class__.__call__"


def guards(model: dict[str, Any]) -> None:
    model["guards_code"] = ["__import__('builtins').open('MARKER', 'w') is None"]


def sympy_expr(model: dict[str, Any]) -> None:
    model["range_constraints"] = {"s0": {"min_val": 1, "max_val": 2}}
    model["graph_module"]["graph"]["sym_int_values"] = {"s0": {"as_expr": {"expr_str": "open('MARKER','w')"}}}


def opaque_constant(data: bytes, payload: bytes) -> bytes:
    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    root = zipfile.ZipFile(io.BytesIO(data)).namelist()[0].split("/")[0]
    return rewrite(data, {"model_constants_config.json": json.dumps(config).encode(), f"{root}/data/constants/opaque_obj_0": payload})


def legacy(data: bytes, payload: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("version", "8.20")
        z.writestr("serialized_exported_program.json", b"{}")
        z.writestr("serialized_state_dict.pt", payload)
    return out.getvalue()


HOSTILE = {
    "pickled sample inputs": lambda d, p, m: rewrite(d, {"data/sample_inputs/model.pt": p}),
    "weight marked use_pickle": lambda d, p, m: pickled_weight(d, p),
    "opaque constant": lambda d, p, m: opaque_constant(d, p),
    "guards code": lambda d, p, m: with_model_json(d, guards, m),
    "sympy expression": lambda d, p, m: with_model_json(d, sympy_expr, m),
    "target outside torch.ops": lambda d, p, m: with_model_json(d, retarget, m),
    "dunder target": lambda d, p, m: with_model_json(d, dunder, m),
    "legacy pickled archive": lambda d, p, m: legacy(d, p),
    "extra entry": lambda d, p, m: rewrite(d, {"archive/extra/x.pkl": p}),
    "deflated entry": lambda d, p, m: _deflated(d),
    "not a zip": lambda d, p, m: p,
    "truncated zip": lambda d, p, m: d[: len(d) // 2],
    "corrupt entry header": lambda d, p, m: d.replace(b"PK\x03\x04", b"PK\x03\x05", 2),
}


def _deflated(data: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_programs_are_refused_and_nothing_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(marker), protocol=2)
    data = HOSTILE[kind](program_bytes(), payload, marker)
    runner = Pt2Runner(write_export(tmp_path / "x", data))
    with pytest.raises(CheckpointError, match=r"refused|not a torch\.export archive|not a loadable"):
        runner(**inputs())
    assert not marker.exists()


def test_a_swapped_phase_file_is_refused_by_its_hash(tmp_path: Path) -> None:
    good = program_bytes()
    torch.manual_seed(1)
    other = io.BytesIO()
    torch.export.save(torch.export.export(Tiny(), args=(), kwargs=inputs()), other)
    folder = write_export(tmp_path / "x", other.getvalue(), sha=hashlib.sha256(good).hexdigest())
    with pytest.raises(CheckpointError, match="sha256 differs"):
        Pt2Runner(folder).program(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("phases", [{"file": "../../etc/passwd.pt2", "sha256": "0" * 64}]),
        ("phases", [{"file": "phase_0.pt2"}]),
        ("phases", [{"file": "/abs/phase_0.pt2", "sha256": "0" * 64}]),
        ("version", 1),
        ("version", True),
        ("num_steps", 0),
        ("timesteps", ["7"]),
        ("step_phase", [3]),
        ("dtype", "evil"),
        ("inputs", {"timestep": {"shape": [1], "dtype": "object"}}),
        ("inputs", {"timestep": {"shape": "big", "dtype": "int64"}}),
        ("batch", -1),
    ],
)
def test_malformed_manifest_fields_are_refused_by_name(field: str, value: Any, tmp_path: Path) -> None:
    folder = write_export(tmp_path / "x", program_bytes())
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest[field] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        Pt2Runner(folder)
    message = str(info.value)
    assert "\n" not in message and field in message


@pytest.mark.parametrize(
    ("field", "value", "refusal"),
    [("num_steps", 10**400, "holds an integer of 401 digits (limit 32)"),
     ("timesteps", [float("nan")], "holds NaN, which is not a JSON number")],
)
def test_manifest_numbers_are_refused_before_conversion(field: str, value: Any, refusal: str, tmp_path: Path) -> None:
    """The bounded JSON reader refuses these while parsing, so the message names the file."""
    folder = write_export(tmp_path / "x", program_bytes())
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest[field] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        Pt2Runner(folder)
    assert str(info.value) == f"{folder / MANIFEST} {refusal} (only finite numbers are accepted)" if "NaN" in refusal \
        else str(info.value) == f"{folder / MANIFEST} {refusal}"
