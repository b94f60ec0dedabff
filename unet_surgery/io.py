"""Atomic file writes: a write that is interrupted leaves no half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unet_surgery.errors import CheckpointError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_bounded_text(path: Path, limit: int, error: type[Exception], *, prefix: str = "", hint: str = "",
                      encoding: str = "utf-8") -> str:
    """The text of a user-named file, refused (``error``, one line) before any parsing when it
    cannot be read, is over ``limit`` bytes, is not ``encoding`` text or holds NUL characters.

    ``prefix`` starts every message (e.g. the option: ``"--prompts: "``); ``hint`` follows the
    size refusal (e.g. ``"; a recipe is a few KiB"``).
    """
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{prefix}cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > limit:
        raise error(f"{prefix}{path} is larger than {limit} bytes{hint}")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if "\x00" in text:
        raise error(f"{prefix}{path} is not a text file (it holds NUL characters)")
    return text


def readable_file(path: Path, *, missing: str) -> Path:
    """``path`` if it is a file this process can open; ``CheckpointError(missing)`` if absent.

    Opening it first lets the OS say why it cannot be read (permission denied raises
    ``PermissionError``): readers such as safetensors report any open failure as "No such
    file or directory".
    """
    if not path.is_file():
        raise CheckpointError(missing)
    with open(path, "rb"):
        pass
    return path


def read_json_object(path: Path, *, missing: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``CheckpointError(missing)`` if absent, or naming the defect."""
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
