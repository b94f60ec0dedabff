"""Write an export folder so that an interrupted write never leaves a loadable half, and an
export never replaces a folder it does not own.

Everything is written into a hidden sibling folder ``.NAME.PID-RANDOM.partial``; only when
every file is complete is it renamed onto the target (one atomic ``rename``). The target may
be absent, an empty folder, or an earlier export: a folder whose manifest (``adapter.json`` or
``manifest.json`` of this library's formats) lists, in ``export_files``, exactly the files
the folder holds. Any other folder -- one with a file the manifest does not list, a
subfolder, a manifest of something else, or none -- is refused, so no foreign file is ever
deleted. A ``kill -9`` cannot run cleanup code, so each run first removes
the staging folders of the same target whose process is gone (a staging folder is recognised
by its name and by the ``.unet-surgery-stage`` file created in it first, never by name alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unet_surgery.errors import SurgeryError
from unet_surgery.io import (
    check_not_input,
    default_file_mode,
    excerpt,
    may_replace,
    parse_bounded_json,
    read_bounded_json,
)

STAGE_TAG = ".unet-surgery-stage"
# Manifests that can prove a folder is an export of ours, and the formats they must declare.
OWNERS = {"adapter.json": "unet-surgery-adapter", "manifest.json": "unet-surgery-pt2", "toy.json": "unet-surgery-toy"}
_MAX_OWNER_BYTES = 16 << 20


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_stages(target: Path) -> list[Path]:
    """Delete ``.NAME.PID-*.partial`` / ``.old`` folders beside ``target`` left by dead processes."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([0-9]+)-[0-9a-f]{{16}}\.(partial|old)")
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or not (entry / STAGE_TAG).is_file():
            continue
        if int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def export_files(stage: Path, manifest: str) -> list[str]:
    """The ``export_files`` a manifest written last into ``stage`` must list: everything, itself included."""
    return sorted({entry.name for entry in stage.iterdir() if entry.name != STAGE_TAG} | {manifest})


def _owned_files(folder: Path) -> set[str] | None:
    """The files an export manifest in ``folder`` lists, or None without a manifest of ours."""
    for name, fmt in OWNERS.items():
        file = folder / name
        if file.is_symlink() or not file.is_file() or file.stat().st_size > _MAX_OWNER_BYTES:
            continue
        try:
            data = read_bounded_json(file, SurgeryError, limit=_MAX_OWNER_BYTES)
        except SurgeryError:
            continue
        files = data.get("export_files") if isinstance(data, dict) and data.get("format") == fmt else None
        if isinstance(files, list) and name in files and all(
            isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in files
        ):
            return set(files)
    return None


def check_owned(target: Path) -> None:
    """Refuse ``target`` unless it is absent, an empty folder or exactly an earlier export."""
    if target.is_symlink():
        raise SurgeryError(f"{target} is a symbolic link; refusing to write through it")
    if not target.exists():
        return
    if not target.is_dir():
        raise SurgeryError(f"{target} exists and is not a folder")
    present = {entry.name for entry in target.iterdir()}
    if not present:
        return
    listed = _owned_files(target)
    if listed is None:
        raise SurgeryError(f"{target} is a non-empty folder that is not an unet-surgery export; refusing to overwrite it")
    extra = sorted(present - listed)
    odd = [name for name in sorted(present & listed) if (target / name).is_symlink() or not (target / name).is_file()]
    if extra or odd:
        raise SurgeryError(
            f"{target} holds {(extra or odd)[0]!r}, which is not part of the earlier export; "
            "refusing to overwrite it (move your own files out, or choose another folder)"
        )


def _new_stage(target: Path, kind: str) -> Path:
    path = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(8)}.{kind}"
    path.mkdir()
    (path / STAGE_TAG).touch()
    return path


def _same_files(stage: Path, target: Path) -> bool:
    """Whether ``target`` holds exactly the files of ``stage``, byte for byte."""
    names = {e.name for e in stage.iterdir()}
    if names != {e.name for e in target.iterdir()}:
        return False
    return all(_same_file(stage / name, target / name) for name in sorted(names))


def _same_file(new: Path, old: Path) -> bool:
    """Byte for byte; a safetensors file by its header's content and its data bytes (safetensors
    writes the header's keys in an order that changes from run to run)."""
    if old.is_symlink() or not old.is_file() or new.stat().st_size != old.stat().st_size:
        return False
    with new.open("rb") as a, old.open("rb") as b:
        if new.suffix == ".safetensors":
            heads = [_safetensors_header(f) for f in (a, b)]
            if heads[0] is None or heads[0] != heads[1]:
                return False
        while True:
            block = a.read(1 << 20)
            if block != b.read(1 << 20):
                return False
            if not block:
                return True


def _safetensors_header(f: Any) -> Any:
    """The parsed JSON header of a safetensors file, the file left at its data; None if malformed."""
    size = int.from_bytes(f.read(8), "little")
    if size > _MAX_OWNER_BYTES:
        return None
    try:
        return parse_bounded_json(f.read(size).decode("utf-8"), f.name, ValueError)
    except ValueError:  # also UnicodeDecodeError
        return None


def _plain_modes(stage: Path) -> None:
    """A new file's permissions for every file written (some writers use ``mkstemp``'s 0600)."""
    mode = default_file_mode()
    for entry in stage.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(mode)
    stage.chmod(mode | ((mode & 0o444) >> 2))  # r -> x: a folder readable by whoever may read its files


def recorded_recipe_name(target: Path) -> str | None:
    """The recipe name an earlier export in ``target`` records in its manifest, if any."""
    if target.is_symlink() or not target.is_dir():
        return None
    for name, fmt in OWNERS.items():
        file = target / name
        if file.is_symlink() or not file.is_file():
            continue
        try:
            data = read_bounded_json(file, SurgeryError, limit=_MAX_OWNER_BYTES)
        except SurgeryError:
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            recipe = data.get("recipe")
            recipe = recipe.get("name") if isinstance(recipe, dict) else recipe
            return recipe if isinstance(recipe, str) else None
    return None


def check_export_target(target: Path, *, source: Path, recipe_name: str, overwrite: bool) -> None:
    """What ``apply --out`` and ``export`` check before loading any weights: the target is not
    the input, inside it or above it; it is absent, empty or an export of ours; and without
    ``overwrite`` an earlier export made with another recipe is refused at once (one with the
    same recipe is compared file by file once the new export is written)."""
    check_not_input(target, [source], SurgeryError, option="--out", replaces_folder=True)
    check_owned(target)
    earlier = recorded_recipe_name(target)
    if earlier is not None and earlier != recipe_name:
        may_replace(target, same=False, overwrite=overwrite, error=SurgeryError,
                    what=f"an earlier export made with another recipe ({excerpt(earlier)})")


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``target``, on failure it vanishes.

    An earlier export at ``target`` holding the same files byte for byte is kept as it is;
    one with other content is replaced only with ``overwrite`` (:func:`unet_surgery.io.may_replace`).
    """
    target = Path(target)
    check_owned(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(target)
    stage = _new_stage(target, "partial")
    old: Path | None = None
    try:
        yield stage
        (stage / STAGE_TAG).unlink()
        _plain_modes(stage)
        check_owned(target)  # again: the folder may have gained files while we wrote
        if target.exists() and any(target.iterdir()) and not may_replace(
            target, same=_same_files(stage, target), overwrite=overwrite, error=SurgeryError,
            what="an earlier export with other content",
        ):
            shutil.rmtree(stage, ignore_errors=True)  # the same export is already there
            return
        if target.exists():
            old = _new_stage(target, "old")
            os.replace(target, old / "previous")
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not target.exists() and (old / "previous").exists():
            os.replace(old / "previous", target)  # put the earlier export back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
