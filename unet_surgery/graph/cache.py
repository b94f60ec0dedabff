"""Map once per architecture: a content-addressed cache of :class:`UNetMap` s.

A map depends on the module tree and the forward code, never on the weights, yet mapping
costs one ``torch.export`` (seconds for SD1.5, tens of seconds for SDXL on a CPU). So maps are
cached under a key that hashes everything a map can depend on:

* the model's class and its structure: every module's path, class and ``extra_repr`` (kernel
  sizes, strides, dilations, groups...), every parameter's and buffer's shape, and the
  diffusers ``config`` where there is one; not dtypes, devices or values;
* how it is probed (latent size, frames, method);
* the versions of torch and diffusers (their forward code is part of what is traced) and a
  digest of this package's graph code, so a change of the mapper invalidates every entry.

Lookups go memory -> user cache folder -> maps shipped with the package (the presets' maps,
under ``unet_surgery/architectures/maps/``, built by ``scripts/ship_maps.py``). Entries are
JSON written atomically and read through the project's bounded JSON reader
(:func:`unet_surgery.io.read_bounded_json`'s limits, at most :data:`MAX_MAP_BYTES`); an
unreadable, oversized, over-deep or malformed one is ignored and rebuilt. ``UNET_SURGERY_CACHE``
moves the user folder, ``UNET_SURGERY_NO_MAP_CACHE=1`` switches the cache off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_surgery.graph.records import UNetMap
from unet_surgery.io import atomic_write_text, parse_bounded_json, read_bounded_bytes

MAX_MAP_BYTES = 4 << 20  # the largest shipped map (ModelScope T2V) is under 100 KiB
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_memory: dict[str, str] = {}


def cache_dir() -> Path:
    """The user's map cache folder (``UNET_SURGERY_CACHE``, else the XDG cache folder)."""
    root = os.environ.get("UNET_SURGERY_CACHE")
    if root:
        return Path(root) / "maps"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "unet-surgery" / "maps"


def enabled() -> bool:
    return os.environ.get("UNET_SURGERY_NO_MAP_CACHE", "") in ("", "0")


@functools.cache
def code_digest() -> str:
    """Digest of the graph package's source: any change to the mapper invalidates the cache."""
    digest = hashlib.sha256()
    for file in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def versions() -> dict[str, str]:
    """The library versions a map key includes: torch (without its build tag: CPU and CUDA
    builds trace the same code), and diffusers where installed."""
    out = {"torch": str(torch.__version__).split("+")[0]}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["diffusers"] = metadata.version("diffusers")
    return out


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "items"):
        return None
    return {k: v for k, v in sorted(config.items()) if not k.startswith("_")}


def structure(model: nn.Module) -> dict[str, Any]:
    """What the key hashes about a model: classes, module settings, tensor shapes, config."""
    modules = []
    for name, module in model.named_modules():
        cls = type(module)
        own = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)]
        own += [(n, tuple(b.shape)) for n, b in module.named_buffers(recurse=False)]
        modules.append([name, f"{cls.__module__}.{cls.__qualname__}", _ADDRESS.sub("", module.extra_repr()), own])
    return {"modules": modules, "config": _config(model)}


def map_key(model: nn.Module, probe: dict[str, Any]) -> str:
    """The content address of ``model``'s map under the probe settings ``probe``."""
    document = {"structure": structure(model), "probe": probe, "versions": versions(), "code": code_digest()}
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shipped_dir() -> Path:
    return Path(str(resources.files("unet_surgery.architectures").joinpath("maps")))


class _UnusableEntry(Exception):
    """A cache entry that cannot be used (the lookup then maps the model again)."""


def _read(path: Path) -> str | None:
    """The text of the entry at ``path`` if it is a regular file within the bounds and a valid
    map; None otherwise (missing, a FIFO, oversized, over-deep, not a map...)."""
    if not path.is_file():
        return None
    try:
        text = read_bounded_bytes(path, MAX_MAP_BYTES, _UnusableEntry).decode("utf-8")
        UNetMap.from_dict(parse_bounded_json(text, str(path), _UnusableEntry))
    except (_UnusableEntry, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IndexError):
        return None
    return text


def _write(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):  # a read-only or full cache folder only costs the next lookup a re-map
        atomic_write_text(path, text)


def lookup(key: str) -> UNetMap | None:
    """The cached map of ``key`` (a fresh copy), from memory, the user folder or the package."""
    text = _memory.get(key)
    if text is None:
        for folder in (cache_dir(), shipped_dir()):
            text = _read(folder / f"{key}.json")
            if text is not None:
                _memory[key] = text
                break
    return None if text is None else UNetMap.from_dict(json.loads(text))


def store(key: str, unet_map: UNetMap) -> None:
    text = unet_map.to_json()
    _memory[key] = text
    _write(cache_dir() / f"{key}.json", text)


def cached_map(model: nn.Module, probe: dict[str, Any], build: Callable[[], UNetMap]) -> UNetMap:
    """``build()``'s map of ``model``, computed once per architecture and probe settings."""
    if not enabled():
        return build()
    key = map_key(model, probe)
    found = lookup(key)
    if found is not None:
        return found
    unet_map = build()
    store(key, unet_map)
    return UNetMap.from_dict(json.loads(unet_map.to_json()))


def clear_memory() -> None:
    """Forget the in-memory entries (the folders stay)."""
    _memory.clear()
