"""Field-by-field checks of the JSON manifests an export writes, before any file they name is read.

A manifest is input like any other: a deleted ``files`` list must not switch the hash check
off, a file name must not climb out of its folder, a version must be one we read, and every
enum and number must be in range. Each check names the file and the field it refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, TypeGuard

from unet_surgery.errors import CheckpointError

SHA256 = re.compile(r"[0-9a-f]{64}")
# Floating dtypes an export may declare (the weights it was made from and the inputs it froze).
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INPUT_DTYPES = (*FLOAT_DTYPES, "int64", "int32")
MAX_STEPS = 10_000


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


MAX_MANIFEST_BYTES = 16 << 20


def read_manifest(path: Path, *, missing: str) -> dict[str, Any]:
    """A manifest's JSON object; an oversized, over-deep or over-long-number file is one clear error."""
    from unet_surgery.io import read_json_object

    if path.is_file() and path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
    try:
        return read_json_object(path, missing=missing)
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a manifest") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise CheckpointError(f"{path} is not a valid manifest ({str(exc).splitlines()[0][:120]})") from None


def field_error(file: Path, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"{file}: field {field!r} {why}")


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(meta: dict[str, Any], field: str, file: Path, low: int, high: int) -> int:
    value = meta.get(field)
    if not is_int(value) or not low <= value <= high:
        raise field_error(file, field, f"must be an integer in [{low}, {high}], got {str(value)[:40]!r}")
    return int(value)


def require_choice(meta: dict[str, Any], field: str, file: Path, choices: tuple[str, ...], label: str = "") -> str:
    value = meta.get(field)
    if value not in choices:
        raise field_error(file, label or field, f"must be one of {', '.join(choices)}, got {str(value)[:40]!r}")
    return str(value)


def require_str(meta: dict[str, Any], field: str, file: Path, limit: int = 256) -> str:
    value = meta.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise field_error(file, field, f"must be a non-empty string of at most {limit} characters")
    return value


def plain_file_name(name: Any, file: Path, field: str) -> str:
    """A bare file name: no folder part, no ``..``, nothing hidden, printable ASCII."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", name) or ".." in name:
        raise field_error(file, field, f"must name a plain file in the same folder, got {str(name)[:80]!r}")
    return name


def check_format_version(meta: dict[str, Any], file: Path, fmt: str, versions: tuple[int, ...]) -> int:
    if meta.get("format") != fmt:
        raise CheckpointError(f"{file} is not a {fmt} file")
    version = meta.get("version")
    if not is_int(version) or version not in versions:
        raise CheckpointError(
            f"{file}: format version {repr(version)[:40]} is not one this unet-surgery reads "
            f"({', '.join(map(str, versions))}); upgrade unet-surgery or export again"
        )
    return int(version)


def _int_list(value: Any, length: int | None, low: int, high: int) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(is_int(v) and low <= v <= high for v in value)
    )


def check_pt2_manifest(meta: dict[str, Any], file: Path, fmt: str, version: int) -> None:
    """Every field :class:`~unet_surgery.export.pt2.Pt2Runner` reads, typed and in range."""
    check_format_version(meta, file, fmt, (version,))
    steps = require_int(meta, "num_steps", file, 1, MAX_STEPS)
    require_int(meta, "batch", file, 1, 4096)
    require_choice(meta, "dtype", file, FLOAT_DTYPES)
    for key in ("resolution", "latent_hw"):
        if not _int_list(meta.get(key), 2, 1, 1 << 20):
            raise field_error(file, key, "must be two positive integers")
    timesteps = meta.get("timesteps")
    if not isinstance(timesteps, list) or len(timesteps) != steps or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in timesteps
    ):
        raise field_error(file, "timesteps", f"must be {steps} finite numbers")
    phases = meta.get("phases")
    if not isinstance(phases, list) or not 1 <= len(phases) <= steps:
        raise field_error(file, "phases", f"must be a list of 1 to {steps} phases")
    seen: set[str] = set()
    for k, phase in enumerate(phases):
        where = f"phases[{k}]"
        if not isinstance(phase, dict):
            raise field_error(file, where, "must be an object")
        name = plain_file_name(phase.get("file"), file, f"{where}.file")
        if not name.endswith(".pt2") or name in seen:
            raise field_error(file, f"{where}.file", f"must be a distinct .pt2 file name, got {name!r}")
        seen.add(name)
        if not isinstance(phase.get("sha256"), str) or not SHA256.fullmatch(phase["sha256"]):
            raise field_error(file, f"{where}.sha256", "must be the file's sha256 (64 hex digits)")
    if not _int_list(meta.get("step_phase"), steps, 0, len(phases) - 1):
        raise field_error(file, "step_phase", f"must be {steps} phase indices below {len(phases)}")
    inputs = meta.get("inputs")
    if not isinstance(inputs, dict) or "timestep" not in inputs:
        raise field_error(file, "inputs", "must describe the program's inputs, timestep included")
    for name, spec in inputs.items():
        if not isinstance(spec, dict) or not _int_list(spec.get("shape"), None, 0, 1 << 24) or len(spec["shape"]) > 8:
            raise field_error(file, f"inputs.{str(name)[:40]}.shape", "must be a list of at most 8 sizes")
        require_choice(spec, "dtype", file, INPUT_DTYPES, f"inputs.{str(name)[:40]}.dtype")


_LAYER_PATH = re.compile(r"[A-Za-z0-9_.]{1,300}")
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def manifest_digest(meta: dict[str, Any]) -> str:
    """sha256 of every field but ``manifest_sha256`` itself, as canonical JSON.

    Catches an edited field (a trimmed ``layers`` list, a changed version) and a deleted
    ``files`` list. It is integrity, not authenticity: whoever can rewrite the folder can
    recompute it; the base fingerprint and the recomputed kernels are checked on load too.
    """
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_adapter_meta(meta: dict[str, Any], file: Path, fmt: str, versions: tuple[int, ...], files: tuple[str, ...]) -> None:
    """Every field of ``adapter.json``: required, typed, in range, and covered by its digest."""
    check_format_version(meta, file, fmt, versions)
    if meta.get("manifest_sha256") != manifest_digest(meta):
        raise field_error(file, "manifest_sha256", "does not match the manifest: the file was edited after export")
    listed = meta.get("files")
    if not isinstance(listed, dict) or set(listed) != set(files):
        raise field_error(file, "files", f"must list exactly {', '.join(files)} with their sha256")
    for name, digest in listed.items():
        plain_file_name(name, file, f"files[{name!r}]")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise field_error(file, f"files[{name!r}]", "must be a sha256 (64 hex digits)")
    require_str(meta, "recipe", file)
    require_str(meta, "model_class", file, 128)
    if not isinstance(meta.get("fingerprint"), str) or not FINGERPRINT.fullmatch(meta["fingerprint"]):
        raise field_error(file, "fingerprint", "must be sha256:<64 hex digits>")
    require_choice(meta, "dtype", file, FLOAT_DTYPES)
    require_int(meta, "num_train_timesteps", file, 1, 100_000)
    if not isinstance(meta.get("filtered"), bool):
        raise field_error(file, "filtered", "must be true or false")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not all(
        isinstance(group, str) and isinstance(paths, list) and all(isinstance(p, str) and _LAYER_PATH.fullmatch(p) for p in paths)
        for group, paths in layers.items()
    ):
        raise field_error(file, "layers", "must map each group to a list of module paths")
