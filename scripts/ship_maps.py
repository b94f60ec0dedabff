"""Map every preset at full size (on meta) and write the maps the package ships.

``map_unet`` looks maps up by a content address (:mod:`unet_surgery.graph.cache`) that includes
the torch and diffusers versions and a digest of the mapper's code, so shipped maps are used
exactly when they are what ``map_unet`` would compute. Re-run this after changing
``unet_surgery/graph/`` or the pinned library versions (``tests/graph/test_map_cache.py`` says so):

    python scripts/ship_maps.py
"""

from __future__ import annotations

import json
import time

from unet_surgery.graph import cache, map_unet
from unet_surgery.graph.mapper import DEFAULT_PROBE
from unet_surgery.presets import PRESETS, build_unet


def main() -> None:
    folder = cache.shipped_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    index = {}
    for name in PRESETS:
        t0 = time.perf_counter()
        model = build_unet(name, size="full", device="meta")
        key = cache.map_key(model, DEFAULT_PROBE)
        (folder / f"{key}.json").write_text(map_unet(model, cache=False).to_json())
        index[name] = key
        print(f"{name:16s} {key}  {time.perf_counter() - t0:5.1f} s", flush=True)
    (folder / "index.json").write_text(json.dumps({"versions": cache.versions(), "code": cache.code_digest(),
                                                   "presets": index}, indent=2) + "\n")


if __name__ == "__main__":
    main()
