"""Settings embedded in each PNG's text chunks, read back for resuming, and the manifest lines.

A PNG carries three iTXt chunks:

* ``unet_surgery.settings``: canonical JSON (sorted keys) with two parts. ``request`` is what
  decides the pixels: model fingerprints, pipeline class, recipe, prompt, negative prompt, seed,
  size, steps, guidance, scheduler, init image, mask, ControlNet (fingerprint, condition image,
  scale, end), dtype. ``environment`` is where it ran: versions,
  device type, the model path as given. A rerun skips a file whose ``request`` equals its own;
* ``unet_surgery.recipe``: the recipe document (YAML) as applied, empty without a recipe (the
  request holds its name and sha256);
* ``parameters``: the same in the one-line style image viewers show.

Nothing varies between processes (no rank, host or time), so a file's bytes depend only on its
job and settings. Files are written through a temporary file and a rename: a crash leaves the
old file or none, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unet_surgery.io import atomic_path, open_regular, parse_bounded_json, read_bounded_text

SETTINGS_KEY = "unet_surgery.settings"
RECIPE_KEY = "unet_surgery.recipe"
PARAMETERS_KEY = "parameters"
FORMAT = "unet-surgery-generate/1"


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces beyond separators, non-ASCII kept: the same object, the same bytes."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def parameters_line(request: dict[str, Any]) -> str:
    """The human summary (prompt, then ``Negative prompt:``, then ``key: value`` pairs)."""
    recipe = request.get("recipe") or {}
    pairs = [
        ("Steps", request["steps"]),
        ("Sampler", request["scheduler"]["class"]),
        ("CFG scale", request["guidance_scale"]),
        ("Seed", request["seed"]),
        ("Size", f"{request['width']}x{request['height']}"),
        ("Model hash", request["model"]["fingerprint"]),
        ("Recipe", recipe.get("name", "none")),
    ]
    if request.get("init_image"):
        pairs.append(("Denoising strength", request["init_image"]["strength"]))
    if request.get("mask"):
        pairs.append(("Mask hash", request["mask"]["sha256"]))
    if request.get("controlnet"):
        control = request["controlnet"]
        pairs += [("ControlNet hash", control["fingerprint"]), ("Control image hash", control["image_sha256"]),
                  ("ControlNet scale", control["scale"]), ("ControlNet end", control["end"])]
    lines = [request["prompt"]]
    if request.get("negative_prompt"):
        lines.append(f"Negative prompt: {request['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def png_info(settings: dict[str, Any], recipe_document: str) -> Any:
    """The PIL ``PngInfo`` with the three text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(SETTINGS_KEY, canonical_json(settings), zip=True)
    info.add_itxt(RECIPE_KEY, recipe_document, zip=True)
    info.add_itxt(PARAMETERS_KEY, parameters_line(settings["request"]))
    return info


def write_png(path: Path, image: Any, settings: dict[str, Any], recipe_document: str) -> str:
    """Write ``image`` with its settings atomically; return the sha256 of the file's bytes."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings, recipe_document))
        digest = file_sha256(tmp)
    return digest


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically, readable as any new file would be."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings a PNG carries, or ``None`` if it is not a readable PNG written by ``generate``."""
    try:
        with open_image(path, ["PNG"]) as image:  # the header's size checked before any pixel is decoded
            image.load()  # a truncated file fails here, not later
            text = getattr(image, "text", {}).get(SETTINGS_KEY)
    except (OSError, SyntaxError, ValueError):  # ImageTooLarge is a ValueError
        return None
    if not isinstance(text, str):
        return None
    with contextlib.suppress(ValueError):
        data = parse_bounded_json(text, str(path), ValueError)
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("request"), dict):
            return data
    return None


MAX_PIXELS = 1 << 26  # 8192 x 8192: an RGB copy is 192 MiB


class ImageTooLarge(ValueError):
    """An image whose header claims more than :data:`MAX_PIXELS` pixels (refused undecoded)."""


@contextlib.contextmanager
def open_image(path: Path, formats: list[str] | None = None) -> Iterator[Any]:
    """A PIL image of a regular file, its header read and its size checked, no pixel decoded yet.

    More than :data:`MAX_PIXELS` is :class:`ImageTooLarge` naming the claimed size (PIL's own
    decompression-bomb check, which fires first above 2 x 89 M pixels, gives the same refusal).
    """
    from PIL import Image

    with warnings.catch_warnings(), open_regular(path) as f:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound below
        try:
            image = Image.open(f, formats=formats)
        except Image.DecompressionBombError:
            size = _header_size(f)
            raise ImageTooLarge(_too_large(path, size)) from None
        with image:
            if image.size[0] * image.size[1] > MAX_PIXELS:
                raise ImageTooLarge(_too_large(path, image.size))
            yield image


def _too_large(path: Path, size: tuple[int, int] | None) -> str:
    claimed = f"{size[0]}x{size[1]}" if size else "more"
    return f"{path} claims {claimed} pixels, more than the limit of {MAX_PIXELS} (8192x8192)"


def _header_size(f: Any) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR (for the message only; other formats: None)."""
    f.seek(0)
    head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed writer of ``path`` left (``atomic_path``'s ``.NAME.*.tmp``)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


MAX_MANIFEST_BYTES = 1 << 30
IMAGE_NAME = re.compile(r"p[0-9]{4,}-s[0-9]{6,}\.png")  # Job.file_name


def read_manifest(path: Path) -> dict[str, str]:
    """The lines of a ``manifest.jsonl`` that ``generate`` wrote, by file name (none if absent).

    A file there that ``generate`` did not write -- not a regular file, or a line that is not one
    of ours (a JSON object naming one of our image files and its sha256) -- is refused, so a run
    never writes over it.
    """
    from unet_surgery.generation.jobs import GenerationError

    if not path.exists() and not path.is_symlink():
        return {}
    refusal = f"--out: {path} was not written by generate; move it away (generate never writes over it)"
    if path.is_symlink() or not path.is_file():
        raise GenerationError(refusal)
    text = read_bounded_text(path, MAX_MANIFEST_BYTES, GenerationError, prefix="--out: ")
    lines: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            data = parse_bounded_json(line, str(path), ValueError)
        except ValueError:
            raise GenerationError(refusal) from None
        name = data.get("file") if isinstance(data, dict) else None
        digest = data.get("sha256") if isinstance(data, dict) else None
        if not (isinstance(name, str) and IMAGE_NAME.fullmatch(name) and isinstance(digest, str)
                and digest.startswith("sha256:")):
            raise GenerationError(refusal)
        lines[name] = line
    return lines


def earlier_lines(folder: Path, earlier: dict[str, str], current: set[str]) -> list[str]:
    """Manifest lines for the images of earlier runs still in ``folder`` (not in ``current``):
    the earlier line while the file's sha256 still matches, else one made from the settings the
    PNG carries; files ``generate`` did not write are left out."""
    kept = []
    for file in sorted(folder.iterdir()):
        if file.name in current or not IMAGE_NAME.fullmatch(file.name) or file.is_symlink() or not file.is_file():
            continue
        digest = file_sha256(file)
        line = earlier.get(file.name)
        if line is not None and json.loads(line).get("sha256") == digest:
            kept.append(line)
            continue
        settings = read_settings(file)
        if settings is not None:
            kept.append(manifest_line(file.name, digest, settings))
    return kept


def manifest_line(file_name: str, digest: str, settings: dict[str, Any]) -> str:
    """One JSON line: the file, its sha256 and its request (the recipe by name and digest)."""
    return canonical_json({"file": file_name, "sha256": digest, **settings["request"]})
