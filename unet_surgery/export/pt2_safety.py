"""Load a ``.pt2`` program without ever unpickling or evaluating what the file brings.

``torch.export.load`` unpickles in four places (a weight or constant marked ``use_pickle``,
custom and opaque objects, and -- after a failed weights-only try -- the sample inputs), falls
back to an older, pickled format when the archive is unreadable, turns ``guards_code``
strings into Python source that it runs, parses symbolic shapes with ``sympy.sympify`` (an
``eval``), and resolves node targets by ``getattr`` on any path under ``torch``. The programs
this library writes use none of that: static shapes, raw tensor payloads, ``torch.ops``
operators and ``operator.getitem``. So an archive is read and checked first, and loaded only
if it holds nothing else; the load then runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set, and
the loaded graph's targets are checked again before anything can run it.
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from unet_surgery.errors import CheckpointError
from unet_surgery.io import parse_bounded_json

# Entries (under the archive's one top folder) a program of ours holds; anything else is refused.
_FIXED = {
    "archive_format",
    "archive_version",
    ".data/version",
    ".data/serialization_id",
    "byteorder",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
}
_PAYLOAD = re.compile(r"data/(weights/weight|constants/tensor)_[0-9]+")
_NAME = r"(?!__)[A-Za-z_][A-Za-z0-9_]*"  # no dunder: no walk to __globals__ and the like
_TARGET = re.compile(rf"torch\.ops\.{_NAME}\.{_NAME}\.{_NAME}|_operator\.getitem")
# Graph fields that torch evaluates as code or unpickles; a static program leaves them empty.
_MUST_BE_EMPTY = ("guards_code", "range_constraints")
_GRAPH_EMPTY = ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values")
_REFUSED_KEYS = {"as_expr", "expr_str", "as_custom_obj", "as_graph", "as_operator"}
_MAX_JSON = 1 << 28  # 256 MiB of graph description is far beyond any UNet
_LOAD_LOCK = threading.Lock()


def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is refused: {why} (unet-surgery loads only the plain programs it writes)")


def _walk_keys(node: Any, path: Path) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in _REFUSED_KEYS or key.startswith("as_sym"):
                    raise _refuse(path, f"its graph holds a {key!r} value")
                if key == "target" and isinstance(value, str) and not _TARGET.fullmatch(value):
                    raise _refuse(path, f"its graph calls {value[:80]!r}, not a torch operator")
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    if archive.getinfo(name).file_size > _MAX_JSON:
        raise _refuse(path, f"{name} is larger than {_MAX_JSON} bytes")
    try:
        text = archive.read(name).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(path, f"{name} is not UTF-8 JSON ({exc.reason})") from None
    try:
        return parse_bounded_json(text, name, CheckpointError)
    except CheckpointError as exc:
        raise _refuse(path, str(exc)) from None


def _check_payload_config(config: Any, name: str, path: Path) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refuse(path, f"{name} is malformed")
    for key, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(path, f"{key!r} in {name} is pickled")
        if not isinstance(meta.get("path_name"), str) or not re.fullmatch(r"(weight|tensor)_[0-9]+", meta["path_name"]):
            raise _refuse(path, f"{key!r} in {name} points at {str(meta.get('path_name'))[:80]!r}")


def check_archive(path: Path) -> None:
    """Refuse ``path`` unless it is a plain program: raw tensors, torch operators, static shapes."""
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(archive, path)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a torch.export archive ({str(exc)[:200]})") from exc


def _check_entries(archive: zipfile.ZipFile, path: Path) -> None:
    infos = archive.infolist()
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1:
        raise _refuse(path, "it is not one archive folder")
    root = roots.pop() + "/"
    for info in infos:
        name = info.filename[len(root):]
        if name not in _FIXED and not _PAYLOAD.fullmatch(name):
            raise _refuse(path, f"it holds an unexpected entry {info.filename[:120]!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(path, f"{info.filename[:120]!r} is compressed")
    names = {info.filename[len(root):] for info in infos}
    missing = _FIXED - names
    if missing:
        raise _refuse(path, f"it lacks {sorted(missing)[0]!r}")
    model = _json(archive, root + "models/model.json", path)
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        raise _refuse(path, "models/model.json is malformed")
    for key in _MUST_BE_EMPTY:
        if model.get(key):
            raise _refuse(path, f"its {key} is not empty")
    graph = model["graph_module"].get("graph")
    if not isinstance(graph, dict):
        raise _refuse(path, "models/model.json has no graph")
    for key in _GRAPH_EMPTY:
        if graph.get(key):
            raise _refuse(path, f"its graph's {key} is not empty")
    _walk_keys(model, path)
    for config in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        _check_payload_config(_json(archive, root + config, path), config, path)
    try:  # weights-only, so torch's own first (weights-only) try succeeds and never falls back
        torch.load(io.BytesIO(archive.read(root + "data/sample_inputs/model.pt")), weights_only=True)
    except Exception as exc:
        raise _refuse(path, "its sample inputs are not plain tensors") from exc


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Force every ``torch.load`` in the block to weights-only (torch reads the variable per call)."""
    with _LOAD_LOCK:
        old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            yield
        finally:
            if old is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _check_graph(program: torch.export.ExportedProgram, path: Path) -> None:
    for node in program.graph.nodes:
        if node.op == "call_function" and not (
            isinstance(node.target, torch._ops.OpOverload) or node.target is operator.getitem
        ):
            raise _refuse(path, f"its graph calls {node.target!r}")
        if node.op in ("call_method", "call_module"):
            raise _refuse(path, f"its graph has a {node.op} node")


def safe_load(path: Path) -> torch.export.ExportedProgram:
    """The program in ``path``, after :func:`check_archive`; nothing in the file runs."""
    check_archive(path)
    from torch.export.pt2_archive._package import load_pt2

    try:
        with _weights_only_loads():
            contents = load_pt2(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a loadable torch.export program ({first})") from exc
    program = contents.exported_programs.get("model")
    if program is None or contents.aoti_runners:
        raise _refuse(path, "it holds no plain program")
    _check_graph(program, path)
    return program
