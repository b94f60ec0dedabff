"""Settings embedded in each PNG's text chunks, read back for resuming, and the manifest lines.

A PNG carries three iTXt chunks:

* ``unet_surgery.settings``: canonical JSON (sorted keys) with two parts. ``request`` is what
  decides the pixels: model fingerprints, pipeline class, recipe, prompt, negative prompt, seed,
  size, steps, guidance, scheduler, init image, dtype. ``environment`` is where it ran: versions,
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
import warnings
from pathlib import Path
from typing import Any

from unet_surgery.io import atomic_path, open_regular, parse_bounded_json

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
    from PIL import Image

    try:
        with warnings.catch_warnings(), open_regular(path) as f:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound below
            with Image.open(f, formats=["PNG"]) as image:
                check_pixels(image, str(path))  # the header's size, before any pixel is decoded
                image.load()  # a truncated file fails here, not later
                text = getattr(image, "text", {}).get(SETTINGS_KEY)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, ImageTooLarge):
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


def check_pixels(image: Any, where: str) -> None:
    """Refuse an opened, not yet decoded image whose header claims more than :data:`MAX_PIXELS`."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{where} claims {width}x{height} pixels, more than the limit of {MAX_PIXELS} (8192x8192)")


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed writer of ``path`` left (``atomic_path``'s ``.NAME.*.tmp``)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def manifest_line(file_name: str, digest: str, settings: dict[str, Any]) -> str:
    """One JSON line: the file, its sha256 and its request (the recipe by name and digest)."""
    return canonical_json({"file": file_name, "sha256": digest, **settings["request"]})
