"""Hand-picked mutants: does the test suite notice a realistic, behaviour-changing bug?

Each mutant is one textual change to one file of ``unet_surgery`` (``passes/``, ``sampling/``,
``recipes/auto.py``, ``graph/cache.py``) and the tests that cover that code. For each, the
package is copied to a temporary tree, the change applied there (the checkout is never
touched), the tests run with ``-x``, and the mutant counts as killed when they fail. Bounded:
one pytest run per mutant, each with a time limit.

    nice -n 15 python scripts/mutants.py [--only SUBSTRING] [--timeout 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to unet_surgery/
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments


HID = "tests/passes/test_hidiffusion.py"
FOURI = "tests/passes/test_fouriscale.py"
AUTO = "tests/recipes/test_auto_policy.py"
AUTO_K = (AUTO, "-k", "larger_side or never_repeat or cascade_stages_known")
CACHE_K = ("tests/graph/test_map_cache.py", "-k", "changes_the_key or share_one_entry")
CASCADE = "tests/sampling/test_cascade.py"
GUIDANCE = "tests/patching/test_guidance.py"

MUTANTS = [
    # --- the five that survived before issue 22
    Mutant("fouriscale step rescale set to 1", "passes/fouriscale/__init__.py", "ratio = n / entry.steps", "ratio = 1.0",
           (FOURI, "-k", "another_step_count or official_schedule")),
    Mutant("auto_factor max -> min", "passes/base.py", "ratio = max(latent_hw[0] / base_latent_hw[0]",
           "ratio = min(latent_hw[0] / base_latent_hw[0]", AUTO_K),
    Mutant("diffusers version dropped from the map-cache key", "graph/cache.py",
           'out["diffusers"] = metadata.version("diffusers")', "pass", CACHE_K),
    Mutant("cascade stage dedupe > -> >=", "recipes/auto.py", "st[0] * st[1] > out[-1][0] * out[-1][1]",
           "st[0] * st[1] >= out[-1][0] * out[-1][1]", AUTO_K),
    Mutant("MSW-MSA freeze check flipped", "passes/msw_msa/__init__.py", "setting.quarter is None:",
           "setting.quarter is not None:", (HID, "-k", "freeze")),
    # --- passes/
    Mutant("auto_factor floor -> ceil", "passes/base.py", "math.floor(ratio + 1e-9)", "math.ceil(ratio - 1e-9)", AUTO_K),
    Mutant("empty window tau <= 0 -> < 0", "passes/base.py", "schedule.tau <= 0", "schedule.tau < 0",
           ("tests/patching/test_registry.py",)),
    Mutant("redilate accepts factor 0", "passes/redilate/__init__.py", "        if factor <= 0:", "        if factor < 0:",
           ("tests/recipes/test_recipe_errors.py", "tests/patching/test_registry.py")),
    Mutant("RAU-Net window end inclusive", "passes/rau_net/__init__.py", "<= i < int(n * config.switch)",
           "<= i <= int(n * config.switch)", (HID, "-k", "equals_official_code and sd15")),
    Mutant("RAU-Net window start ignored", "passes/rau_net/__init__.py", "return int(n * config.start) <= i <",
           "return 0 <= i <", (HID, "-k", "equals_official_code and sdxl")),
    Mutant("RAU-Net room check >= -> >", "passes/rau_net/__init__.py", "min(call.latent_hw) >= entry.min_latent",
           "min(call.latent_hw) > entry.min_latent", (HID, "-k", "stays_off")),
    Mutant("RAU-Net minimum latent one level short", "passes/rau_net/__init__.py", "2 ** (deepest + 1)", "2 ** deepest",
           (HID, "-k", "stays_off")),
    Mutant("RAU-Net upsampler found one level off", "passes/rau_net/__init__.py", "convs[k - 1].level == level + 1",
           "convs[k - 1].level >= level", (HID, "-k", "official_modules or builder or misuse")),
    Mutant("RAU-Net restores at the second up transformer", "passes/rau_net/__init__.py", "return n_down - 1 - pool_after",
           "return 1", (HID, "-k", "toy_eps")),
    Mutant("RAU-Net size roles off", "passes/rau_net/__init__.py", "for kept in range(first, deepest):",
           "for kept in range(first, first):", (HID, "-k", "unevenly")),
    Mutant("HiDiffusion playground setting aggressive", "recipes/hidiffusion.py",
           'frozenset({"inpainting", "playground"})', 'frozenset({"inpainting"})', (HID, "-k", "variant")),
    Mutant("MSW-MSA fixed shift ignored", "passes/msw_msa/__init__.py", "quarter=config.shift", "quarter=None",
           (HID, "-k", "fixed_shift")),
    Mutant("MSW-MSA generators shared between passes", "passes/msw_msa/__init__.py", "slot = patch.state.slot(index)",
           "slot = patch.state.slot(0)", (HID, "-k", "two_seeded")),
    Mutant("RAU-Net pairs share one link", "passes/rau_net/__init__.py", "slot = patch.state.slot(index)",
           "slot = patch.state.slot(0)", (HID, "-k", "4x_area")),
    Mutant("guidance combination sign", "passes/noise_damped_cfg/__init__.py", "vanilla_u + (damped_c - damped_u)",
           "vanilla_u + (damped_u - damped_c)", (GUIDANCE,)),
    Mutant("guidance expands [u, c] to [u, c, c]", "passes/noise_damped_cfg/__init__.py",
           "layout = ((0, DAMPED), (0, MAIN), (1, MAIN))",
           "layout = ((0, DAMPED), (1, MAIN), (1, MAIN))", (GUIDANCE,)),
    Mutant("dispersion threshold >= -> >", "passes/disperse/__init__.py", "current.factor / entry.transform.scale >= 1.0",
           "current.factor / entry.transform.scale > 1.0", ("tests/patching/test_dispersed_boundary.py",)),
    Mutant("FreeU schedule ignored", "passes/freeu/__init__.py",
           "return entry.setting() if active_now(patch, entry.schedule, call) else current",
           "return entry.setting()", ("tests/passes/test_freeu.py", "-k", "schedule")),
    Mutant("FouriScale window end inclusive", "passes/fouriscale/__init__.py", "    if step >= stop:", "    if step > stop:",
           (FOURI, "-k", "another_step_count or official_schedule")),
    Mutant("FouriScale auto dilation floor", "passes/fouriscale/__init__.py", "math.ceil(latent_hw[0] / base_latent_hw[0])",
           "math.floor(latent_hw[0] / base_latent_hw[0])", (FOURI, "-k", "official")),
    # --- sampling/
    Mutant("restart step 0.3 -> 0.4", "sampling/cascade.py", "int(0.3 * spec.steps)", "int(0.4 * spec.steps)",
           (CASCADE, "-k", "thirty_percent or literal")),
    Mutant("cosine blend uses t instead of T - t", "sampling/cascade.py",
           "math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps)",
           "math.cos(math.pi * float(t) / num_train_timesteps)", (CASCADE, "-k", "literal or mask")),
    Mutant("CFG combination from the conditional side", "sampling/cascade.py",
           "return out_u + guidance_scale * (out_c - out_u)", "return out_c + guidance_scale * (out_c - out_u)",
           (CASCADE, "-k", "literal")),
    # --- graph/cache.py
    Mutant("map key keeps the torch build tag", "graph/cache.py", 'str(torch.__version__).split("+")[0]',
           "str(torch.__version__)", CACHE_K),
    Mutant("map key ignores module settings", "graph/cache.py", '_ADDRESS.sub("", module.extra_repr())', '""',
           CACHE_K),
]


def run_one(mutant: Mutant, timeout: int) -> tuple[str, float]:
    """'killed', 'survived' or 'timeout' (counted as not killed), and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="unet-surgery-mutant-") as tmp:
        tree = Path(tmp)
        shutil.copytree(ROOT / "unet_surgery", tree / "unet_surgery", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "recipes", "docs"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tree / name)
        target = tree / "unet_surgery" / mutant.file
        text = target.read_text()
        if text.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: {mutant.old!r} occurs {text.count(mutant.old)} times in {mutant.file}")
        target.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start
        took = time.monotonic() - start
        if proc.returncode == 5:  # nothing collected: the selection is wrong, not the mutant
            raise SystemExit(f"{mutant.name}: no test selected by {mutant.tests}")
        return ("killed" if proc.returncode != 0 else "survived"), took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per mutant (default 400)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.only in m.name]
    killed = 0
    for m in chosen:
        verdict, took = run_one(m, args.timeout)
        killed += verdict == "killed"
        print(f"{verdict:8s} {took:6.0f}s  {m.file:28s} {m.name}", flush=True)
    print(f"{killed}/{len(chosen)} killed ({100 * killed / max(1, len(chosen)):.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
