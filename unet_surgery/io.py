"""Reading what users name and writing what we produce, bounded and atomic.

Reads: a user-named file is opened only if it is a regular file (a FIFO or a device would
block or never end), read up to a byte limit, and JSON is parsed with depth, integer-length
and finiteness limits checked before any value is converted. Writes: through a temporary file
renamed into place, so an interrupted write leaves no half-written file, with the permissions
of a plain new file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from unet_surgery.errors import CheckpointError

MAX_JSON_DEPTH = 64  # the deepest JSON the tool writes (a pt2 model.json) is under 20 levels
MAX_INT_DIGITS = 32  # the largest integer the tool writes is a 64-bit seed (19 digits)
MAX_JSON_BYTES = 16 << 20
MAX_EXCERPT = 40


def excerpt(text: str, limit: int = MAX_EXCERPT) -> str:
    """``repr`` of user text cut to ``limit`` characters, so an error line stays short."""
    shown = repr(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def shown_value(value: object) -> str:
    """A value a user gave, for an error line: text cut by :func:`excerpt`, small integers (or
    pairs of them) as written, anything else described; a 5000-digit integer is never converted
    to text."""
    if isinstance(value, str):
        return excerpt(value)
    items = value if isinstance(value, (tuple, list)) else [value]
    if all(isinstance(v, int) and abs(v) < 10**9 for v in items):
        return repr(value)
    return f"a {type(value).__name__} of {'out-of-range or non-integer values' if items else 'nothing'}"


def default_file_mode() -> int:
    """``0o666`` less the umask: what ``open`` gives a new file (``mkstemp`` gives ``0o600``)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX;
    it gets a plain new file's permissions before the rename.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for binary reading if it is a regular file; ``OSError`` otherwise.

    Opened non-blocking and checked on the open descriptor, so a FIFO (whose plain ``open``
    waits for a writer forever) or a device is refused at once, and nothing can be swapped in
    between the check and the read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file"
            raise OSError(f"{path} is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _os_reason(exc: OSError) -> str:
    return exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)


def read_bounded_bytes(path: Path, limit: int, error: type[Exception], *, prefix: str = "", hint: str = "") -> bytes:
    """At most ``limit`` bytes of a regular file, or ``error`` (one line) naming why not."""
    try:
        with open_regular(path) as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        reason = _os_reason(exc)
        raise error(f"{prefix}{reason}" if str(path) in reason else f"{prefix}cannot read {path}: {reason}") from None
    if len(raw) > limit:
        raise error(f"{prefix}{path} is larger than {limit} bytes{hint}")
    return raw


def read_bounded_text(path: Path, limit: int, error: type[Exception], *, prefix: str = "", hint: str = "",
                      encoding: str = "utf-8") -> str:
    """The text of a user-named file, refused (``error``, one line) before any parsing when it
    cannot be read, is not a regular file, is over ``limit`` bytes, is not ``encoding`` text
    or holds NUL characters.

    ``prefix`` starts every message (e.g. the option: ``"--prompts: "``); ``hint`` follows the
    size refusal (e.g. ``"; a recipe is a few KiB"``).
    """
    raw = read_bounded_bytes(path, limit, error, prefix=prefix, hint=hint)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if "\x00" in text:
        raise error(f"{prefix}{path} is not a text file (it holds NUL characters)")
    return text


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deep ``text``'s arrays and objects nest, in one linear pass (strings skipped)."""
    outside = _JSON_STRING.sub('""', text)
    steps = (1 if b in "[{" else -1 for b in _JSON_BRACKET.findall(outside))
    return max(itertools.accumulate(steps, initial=0))


def parse_bounded_json(text: str, where: str, error: type[Exception], *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` for text someone else may have written, bounded before conversion.

    Refused with one ``error`` line naming ``where``: nesting deeper than ``max_depth`` (checked
    before parsing, so the parser cannot exhaust the stack), an integer literal of more than
    :data:`MAX_INT_DIGITS` digits (checked before it is converted, and never printed), ``NaN``
    and ``Infinity`` (not JSON) and floats that overflow to infinity.
    """
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where} is nested {depth} levels deep (limit {max_depth})")

    def integer(literal: str) -> int:
        if len(literal.lstrip("-")) > MAX_INT_DIGITS:
            raise error(f"{where} holds an integer of {len(literal.lstrip('-'))} digits (limit {MAX_INT_DIGITS})")
        return int(literal)

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise error(f"{where} holds the number {excerpt(literal)}, which overflows to infinity")
        return value

    def constant(name: str) -> Any:
        raise error(f"{where} holds {name}, which is not a JSON number (only finite numbers are accepted)")

    try:
        return json.loads(text, parse_int=integer, parse_float=number, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:  # unreachable below max_depth; kept so a lowered stack limit is still one line
        raise error(f"{where} is nested too deeply") from None


def read_bounded_json(path: Path, error: type[Exception], *, limit: int = MAX_JSON_BYTES, prefix: str = "",
                      max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document from a regular file of at most ``limit`` bytes, with the limits of
    :func:`parse_bounded_json`; every defect is one ``error`` line naming the file."""
    raw = read_bounded_bytes(path, limit, error, prefix=prefix)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{prefix}{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return parse_bounded_json(text, f"{prefix}{path}", error, max_depth=max_depth)


def readable_file(path: Path, *, missing: str) -> Path:
    """``path`` if it is a file this process can open; ``CheckpointError(missing)`` if absent.

    Opening it first lets the OS say why it cannot be read (permission denied raises
    ``PermissionError``): readers such as safetensors report any open failure as "No such
    file or directory". A FIFO or device is refused without blocking.
    """
    if not path.is_file():
        raise CheckpointError(missing if not path.exists() or path.is_dir() else f"{path} is not a regular file")
    with open_regular(path):
        pass
    return path


def read_json_object(path: Path, *, missing: str, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON object from ``path`` (bounded: :func:`read_bounded_json`); ``error(missing)`` if absent."""
    if not path.is_file():
        raise error(missing if not path.exists() or path.is_dir() else f"{path} is not a regular file")
    data = read_bounded_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


# --- the one rule for everything the tool writes -------------------------------------------------

def may_replace(target: Path, *, same: bool, overwrite: bool, error: type[Exception], what: str = "other content",
                prefix: str = "") -> bool:
    """The rule every output follows (``generate``'s images, ``apply --out``, ``export``):
    an existing output with the same content is kept (``False``: nothing to write) unless
    ``overwrite``; one with other content is refused (``error``, one line) unless ``overwrite``.
    ``True``: write it. Content the tool did not write is the caller's to refuse first.
    ``prefix`` starts the message (e.g. the option, ``"--out: "``).
    """
    if same:
        return overwrite
    if overwrite:
        return True
    raise error(f"{prefix}{target} holds {what}; refusing to replace it (pass --overwrite, or choose another output)")


def check_not_input(out: Path, inputs: list[Path], error: type[Exception], *, option: str,
                    replaces_folder: bool) -> None:
    """Refuse an output that is one of ``inputs`` or lies inside one; with ``replaces_folder``
    (an export replaces its whole folder) also one that holds an input. Paths are compared
    resolved, so ``./m``, ``m/`` and a symbolic link to ``m`` are the same input."""
    where = out.resolve()
    for given in inputs:
        if not given.exists():  # a preset name, or a path whose absence is reported elsewhere
            continue
        source = given.resolve()
        if where == source:
            raise error(f"{option}: {out} is the input {given}; write the output somewhere else")
        if where.is_relative_to(source) and source.is_dir():
            raise error(f"{option}: {out} is inside the input {given}; write the output somewhere else")
        if replaces_folder and source.is_relative_to(where):
            raise error(f"{option}: {out} holds the input {given}, which replacing it would delete")
