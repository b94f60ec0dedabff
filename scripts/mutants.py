"""Hand-picked mutants: does the test suite notice a realistic, behaviour-changing bug?

Each mutant is one textual change to one file of ``unet_surgery`` (``passes/``, ``sampling/``,
``recipes/auto.py``, ``graph/cache.py``): a flipped comparison, an off-by-one, a changed
constant, a dropped term, swapped arguments. For each, the checkout is copied to a temporary
tree (the checkout itself is never touched), the change applied there, and the test files that
cover that module run with ``-x``; the mutant is killed when they fail. A mutant marked
equivalent computes the same results as the original on every input the code accepts (the
reason is written beside it); it is run too, but counted apart from the kill rate.

``--tests-from REV`` runs the mutants against the tests of an older commit (what the tests
caught before a change); ``--label`` names the run in ``benchmarks/mutants.json``, from which
``benchmarks/mutants.md`` is written (one column per label). Runs of one label add up, so the
mutants can be split over several processes (``--file``, ``--only``), and a later label may carry
the kills of an earlier one whose killing tests did not change (``--carry-killed-from``): then
only the survivors and the mutants whose killing test changed are run again.

    OMP_NUM_THREADS=1 python scripts/mutants.py --label before --tests-from be0f9b6 --file passes/
    OMP_NUM_THREADS=1 python scripts/mutants.py --label after --carry-killed-from before --only 'FreeU threshold'
    OMP_NUM_THREADS=1 python scripts/mutants.py --check     # every mutant applies and compiles
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "mutants.json"
REPORT = ROOT / "benchmarks" / "mutants.md"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to unet_surgery/
    old: str
    new: str
    tests: tuple[str, ...]  # the test files that cover the module
    equivalent: str = ""  # why the change cannot be observed, for an equivalent mutant


# The test files that cover each module (whole files: no -k selection).
REGISTRY = "tests/patching/test_registry.py"
ERRORS = "tests/recipes/test_recipe_errors.py"
SHIPPED = "tests/recipes/test_shipped_recipes.py"
AUTO = "tests/recipes/test_auto_policy.py"
SIZES = "tests/recipes/test_builder_sizes.py"
HID = "tests/passes/test_hidiffusion.py"
FOURI = "tests/passes/test_fouriscale.py"
FREEU = "tests/passes/test_freeu.py"
GUIDANCE = "tests/patching/test_guidance.py"
FOURI_GUIDANCE = "tests/passes/test_fouriscale_guidance.py"
CONTROLNET = "tests/pipelines/test_controlnet.py"
BOUNDARY = "tests/patching/test_dispersed_boundary.py"
ON_THE_FLY = "tests/ops/test_dispersion_on_the_fly.py"
FUSION = "tests/ops/test_scale_fusion.py"
CASCADE = "tests/sampling/test_cascade.py"
PATCHWISE = "tests/sampling/test_patchwise.py"
DEMOFUSION = "tests/sampling/test_demofusion.py"
CACHE = "tests/graph/test_map_cache.py"

MUTANTS = [
    # ------------------------------------------------------------------ passes/base.py
    Mutant("auto_factor max -> min", "passes/base.py", "ratio = max(latent_hw[0] / base_latent_hw[0]",
           "ratio = min(latent_hw[0] / base_latent_hw[0]", (AUTO, REGISTRY)),
    Mutant("auto_factor floor -> ceil", "passes/base.py", "math.floor(ratio + 1e-9)", "math.ceil(ratio - 1e-9)",
           (AUTO, REGISTRY)),
    Mutant("empty window tau <= 0 -> < 0", "passes/base.py", "schedule.tau <= 0", "schedule.tau < 0",
           (REGISTRY, ERRORS)),
    Mutant("step count from the pass, not the sampler's timestep list", "passes/base.py",
           "return call.step, len(tracker.timesteps)", "return call.step, steps", (REGISTRY, FOURI, CASCADE)),
    Mutant("on_missing check flipped", "passes/base.py", 'if getattr(config, "on_missing", "error") == "error":',
           'if getattr(config, "on_missing", "error") != "error":', (REGISTRY, ERRORS)),
    Mutant("default factor preferred over the layer's table entry", "passes/base.py",
           "    if path in config.factors:\n", "    if path in config.factors and config.factor is None:\n",
           (REGISTRY, ERRORS, SHIPPED)),
    # ------------------------------------------------------------------ passes/redilate/__init__.py
    Mutant("redilate accepts factors below 1", "passes/redilate/__init__.py", "if not 1.0 <= factor <= MAX_FACTOR:",
           "if not 0.0 < factor <= MAX_FACTOR:", (REGISTRY, ERRORS)),
    Mutant("redilate plans factor-1 layers", "passes/redilate/__init__.py", "    order = 0\n    skip_factor_one = True",
           "    order = 0\n    skip_factor_one = False", (REGISTRY, ERRORS, SHIPPED)),
    # ------------------------------------------------------------------ passes/disperse/__init__.py
    Mutant("dispersion threshold >= -> >", "passes/disperse/__init__.py", "current.factor / entry.transform.scale >= 1.0",
           "current.factor / entry.transform.scale > 1.0", (BOUNDARY, ON_THE_FLY, REGISTRY)),
    Mutant("dispersed factor scale inverted", "passes/disperse/__init__.py", '"dispersed_factor_scale": 1.0 / t.scale',
           '"dispersed_factor_scale": t.scale', (BOUNDARY, ON_THE_FLY, REGISTRY)),
    # ------------------------------------------------------------------ passes/noise_damped_cfg/__init__.py
    Mutant("guidance combination sign", "passes/noise_damped_cfg/__init__.py", "vanilla_u + (damped_c - damped_u)",
           "vanilla_u + (damped_u - damped_c)", (GUIDANCE, REGISTRY)),
    Mutant("guidance expands [u, c] to [u, c, c]", "passes/noise_damped_cfg/__init__.py",
           "layout = ((0, DAMPED), (0, MAIN), (1, MAIN))", "layout = ((0, DAMPED), (1, MAIN), (1, MAIN))",
           (GUIDANCE, REGISTRY)),
    Mutant("guidance batch groups swapped", "passes/noise_damped_cfg/__init__.py",
           "layout = ((0, DAMPED), (0, MAIN), (1, MAIN))", "layout = ((0, MAIN), (0, DAMPED), (1, DAMPED))",
           (GUIDANCE, REGISTRY)),
    Mutant("same-branch check ignores the schedule", "passes/noise_damped_cfg/__init__.py",
           "elif (d.factor, d.schedule) != (m.factor, m.schedule):", "elif d.factor != m.factor:",
           (GUIDANCE, REGISTRY)),
    # ------------------------------------------------------------------ passes/scale_fusion/__init__.py
    Mutant("fusion only when both sides exceed the base", "passes/scale_fusion/__init__.py",
           "if grid[0] <= base[0] and grid[1] <= base[1]:", "if grid[0] <= base[0] or grid[1] <= base[1]:",
           (FUSION, REGISTRY)),
    Mutant("fusion jitter always on", "passes/scale_fusion/__init__.py", "jitter=PUBLISHED_JITTER if entry.jitter else 0.0,",
           "jitter=PUBLISHED_JITTER,", (FUSION, REGISTRY)),
    # ------------------------------------------------------------------ passes/freeu/__init__.py
    Mutant("FreeU schedule ignored", "passes/freeu/__init__.py",
           "return entry.setting() if active_now(patch, entry.schedule, call) else current",
           "return entry.setting()", (FREEU,)),
    Mutant("FreeU b1/b2 swapped", "passes/freeu/__init__.py", "backbone=config.b1 if stage == 1 else config.b2,",
           "backbone=config.b2 if stage == 1 else config.b1,", (FREEU,)),
    Mutant("FreeU stages counted from the top", "passes/freeu/__init__.py",
           "if s.level is not None}, reverse=True)", "if s.level is not None}, reverse=False)", (FREEU,)),
    Mutant("FreeU threshold fixed at 1", "passes/freeu/__init__.py", "threshold=config.threshold,", "threshold=1,", (FREEU,)),
    # ------------------------------------------------------------------ passes/fouriscale/__init__.py
    Mutant("fouriscale step rescale set to 1", "passes/fouriscale/__init__.py", "ratio = n / entry.steps", "ratio = 1.0",
           (FOURI,)),
    Mutant("FouriScale window end inclusive", "passes/fouriscale/__init__.py", "    if step >= stop:", "    if step > stop:",
           (FOURI,)),
    Mutant("FouriScale auto dilation floor", "passes/fouriscale/__init__.py", "math.ceil(latent_hw[0] / base_latent_hw[0])",
           "math.floor(latent_hw[0] / base_latent_hw[0])", (FOURI,)),
    Mutant("FouriScale low-pass height taken from the width", "passes/fouriscale/__init__.py",
           "LowPass(d, base, call.latent_hw[0], entry.mask_value)",
           "LowPass(d, base, call.latent_hw[1], entry.mask_value)", (FOURI,)),
    Mutant("FouriScale factor rounded instead of ceiled", "passes/fouriscale/__init__.py", "factor=float(math.ceil(d))",
           "factor=float(round(d))", (FOURI,)),
    Mutant("FouriScale decay starts after start_step", "passes/fouriscale/__init__.py", "if progressive and step >= start:",
           "if progressive and step > start:", (FOURI,),
           equivalent="at step == start the decay gives (D - 1) * (stop - start) / (stop - start) + 1 = D, the "
           "undecayed dilation (exact in floats for the integer and half dilations in use)"),
    # ------------------------------------------------------------------ passes/msw_msa/__init__.py
    Mutant("MSW-MSA freeze check flipped", "passes/msw_msa/__init__.py", "setting.quarter is None:",
           "setting.quarter is not None:", (HID,)),
    Mutant("MSW-MSA fixed shift ignored", "passes/msw_msa/__init__.py", "quarter=config.shift", "quarter=None", (HID,)),
    Mutant("MSW-MSA generators shared between passes", "passes/msw_msa/__init__.py", "slot = patch.state.slot(index)",
           "slot = patch.state.slot(0)", (HID,)),
    Mutant("MSW-MSA shift 4 accepted", "passes/msw_msa/__init__.py", "not 0 <= self.shift <= 3:", "not 0 <= self.shift <= 4:",
           (HID, ERRORS)),
    # ------------------------------------------------------------------ passes/rau_net/__init__.py
    Mutant("RAU-Net window end inclusive", "passes/rau_net/__init__.py", "<= i < int(n * config.switch)",
           "<= i <= int(n * config.switch)", (HID,)),
    Mutant("RAU-Net window start ignored", "passes/rau_net/__init__.py", "return int(n * config.start) <= i <",
           "return 0 <= i <", (HID,)),
    Mutant("RAU-Net room check >= -> >", "passes/rau_net/__init__.py", "min(call.latent_hw) >= entry.min_latent",
           "min(call.latent_hw) > entry.min_latent", (HID,)),
    Mutant("RAU-Net minimum latent one level short", "passes/rau_net/__init__.py", "2 ** (deepest + 1)", "2 ** deepest",
           (HID,)),
    Mutant("RAU-Net upsampler found one level off", "passes/rau_net/__init__.py", "convs[k - 1].level == level + 1",
           "convs[k - 1].level >= level", (HID,)),
    Mutant("RAU-Net pairs share one link", "passes/rau_net/__init__.py", "slot = patch.state.slot(index)",
           "slot = patch.state.slot(0)", (HID,)),
    Mutant("RAU-Net restore point one transformer late", "passes/rau_net/__init__.py",
           "    return n_down - 1 - pool_after\n", "    return n_down - pool_after\n", (HID,)),
    Mutant("RAU-Net transformers ordered by their last op", "passes/rau_net/__init__.py",
           "first[path] = min(first.get(path, rec.order), rec.order)",
           "first[path] = max(first.get(path, rec.order), rec.order)", (HID,),
           equivalent="a transformer's attention ops run consecutively, so ordering transformers by their first "
           "or by their last op gives the same order"),
    # ------------------------------------------------------------------ passes/layers.py
    Mutant("conv rewrite does not split batches", "passes/layers.py", "    split_batches=True,",
           "    split_batches=False,", (GUIDANCE, REGISTRY)),
    Mutant("conv summary drops dispersed and low-pass layers at factor 1", "passes/layers.py",
           "if setting.factor == 1.0 and not setting.use_dispersed and setting.lowpass is None:",
           "if setting.factor == 1.0:", (REGISTRY, FOURI),
           equivalent="no handler gives factor 1 with a dispersed kernel (disperse keeps factor-1 settings) or "
           "a low-pass filter (FouriScale runs ceil(d) >= 2 whenever it filters)"),
    # ------------------------------------------------------------------ sampling/cascade.py
    Mutant("restart step 0.3 -> 0.4", "sampling/cascade.py", "int(0.3 * spec.steps)", "int(0.4 * spec.steps)",
           (CASCADE,)),
    Mutant("cosine blend uses t instead of T - t", "sampling/cascade.py",
           "math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps)",
           "math.cos(math.pi * float(t) / num_train_timesteps)", (CASCADE,)),
    Mutant("CFG combination from the conditional side", "sampling/cascade.py",
           "return out_u + guidance_scale * (out_c - out_u)", "return out_c + guidance_scale * (out_c - out_u)",
           (CASCADE,)),
    Mutant("with_steps scales the restart step the wrong way", "sampling/cascade.py",
           "round(spec.restart_step * steps / spec.steps)", "round(spec.restart_step * spec.steps / steps)",
           (CASCADE,)),
    Mutant("with_steps lets the restart step reach the step count", "sampling/cascade.py",
           "min(steps - 1, round(", "min(steps, round(", (CASCADE,)),
    Mutant("mask exponents swapped", "sampling/cascade.py",
           "exponent = m * spec.cosine_scale + (1 - m) * spec.cosine_scale_bg",
           "exponent = m * spec.cosine_scale_bg + (1 - m) * spec.cosine_scale", (CASCADE,)),
    Mutant("stages may shrink on one side", "sampling/cascade.py", "if b[0] < a[0] or b[1] < a[1]:",
           "if b[0] < a[0] and b[1] < a[1]:", (CASCADE,)),
    # ------------------------------------------------------------------ sampling/patchwise.py
    Mutant("views a side: - 1e-6 -> + 1e-6", "sampling/patchwise.py", "return int((size - window) / stride - 1e-6) + 2",
           "return int((size - window) / stride + 1e-6) + 2", (PATCHWISE, DEMOFUSION)),
    Mutant("view origins: row and column swapped", "sampling/patchwise.py",
           "h0, w0 = (i // cols) * stride, (i % cols) * stride", "h0, w0 = (i % cols) * stride, (i // cols) * stride",
           (PATCHWISE, DEMOFUSION)),
    Mutant("left-border views jitter outwards", "sampling/patchwise.py", "dw = rng.randint(-r, 0)",
           "dw = rng.randint(0, r)", (PATCHWISE, DEMOFUSION)),
    Mutant("default stride a quarter window", "sampling/patchwise.py", "max(1, window // 2)", "max(1, window // 4)",
           (PATCHWISE, DEMOFUSION)),
    # ------------------------------------------------------------------ sampling/demofusion.py
    Mutant("DemoFusion scale number rounded", "sampling/demofusion.py", "scale_num = int(max(hs, ws))",
           "scale_num = round(max(hs, ws))", (DEMOFUSION,)),
    Mutant("DemoFusion blur sigma from cosine_scale_2", "sampling/demofusion.py",
           "c3 = 0.99 * cf**spec.cosine_scale_3 + 1e-2", "c3 = 0.99 * cf**spec.cosine_scale_2 + 1e-2", (DEMOFUSION,)),
    Mutant("DemoFusion Gaussian kernel 2s + 1", "sampling/demofusion.py", "kernel_size=2 * s - 1",
           "kernel_size=2 * s + 1", (DEMOFUSION,)),
    Mutant("DemoFusion multi-decoder context 2/8 window", "sampling/demofusion.py",
           "core, pad = window // 4, window // 8 * 3", "core, pad = window // 4, window // 8 * 2", (DEMOFUSION,)),
    Mutant("DemoFusion phase renormalisation dropped", "sampling/demofusion.py",
           "x = (x - x.mean()) / x.std() * anchor_std + anchor_mean", "x = x", (DEMOFUSION,)),
    Mutant("DemoFusion tall-image branch taken for squares", "sampling/demofusion.py",
           "if height > width:\n            cw = int(cw * aspect)", "if height >= width:\n            cw = int(cw * aspect)",
           (DEMOFUSION,),
           equivalent="at height == width the aspect is 1, so either branch leaves both sides at base * s"),
    # ------------------------------------------------------------------ sampling/pipelines.py
    Mutant("SDXL crop corner columns swapped", "sampling/pipelines.py", "rows[:, 2] = top\n        rows[:, 3] = left",
           "rows[:, 2] = left\n        rows[:, 3] = top", (DEMOFUSION, CASCADE)),
    Mutant("SDXL pooled embeddings in [cond, uncond] order", "sampling/pipelines.py",
           '"text_embeds": torch.cat([negative_pooled, pooled])', '"text_embeds": torch.cat([pooled, negative_pooled])',
           (DEMOFUSION, CASCADE, GUIDANCE)),
    # ------------------------------------------------------------------ recipes/auto.py
    Mutant("cascade stage dedupe > -> >=", "recipes/auto.py", "st[0] * st[1] > out[-1][0] * out[-1][1]",
           "st[0] * st[1] >= out[-1][0] * out[-1][1]", (AUTO, SIZES)),
    Mutant("cascade stage count floored", "recipes/auto.py", "n = max(1, math.ceil(math.log2(ratio) - 1e-9))",
           "n = max(1, math.floor(math.log2(ratio) + 1e-9))", (AUTO, SIZES)),
    Mutant("restrained dilation takes the downsampler of the deepest level", "recipes/auto.py",
           "c.level == deepest - 1 and max(c.spatial_stride) > 1", "c.level == deepest and max(c.spatial_stride) > 1",
           (AUTO, SIZES)),
    Mutant("ScaleCrafter policy re-dilates level 0", "recipes/auto.py", "if level < 1:\n            continue",
           "if level < 0:\n            continue", (AUTO, SIZES, SHIPPED)),
    Mutant("ScaleCrafter depth factor level instead of level + 1", "recipes/auto.py", "min(scale, level + 1)",
           "min(scale, level)", (AUTO, SIZES, SHIPPED)),
    Mutant("ScaleCrafter tau 30/35 swapped", "recipes/auto.py", "tau=35 if progressive else 30",
           "tau=30 if progressive else 35", (AUTO, SIZES, SHIPPED)),
    Mutant("ScaleCrafter upsampler found at the same level", "recipes/auto.py", "and conv.level < previous.level",
           "and conv.level <= previous.level", (AUTO, SIZES, SHIPPED)),
    # ------------------------------------------------------------------ graph/cache.py
    Mutant("diffusers version dropped from the map-cache key", "graph/cache.py",
           'out["diffusers"] = metadata.version("diffusers")', "pass", (CACHE,)),
    Mutant("map key keeps the torch build tag", "graph/cache.py", 'str(torch.__version__).split("+")[0]',
           "str(torch.__version__)", (CACHE,)),
    Mutant("map key ignores module settings", "graph/cache.py", '_ADDRESS.sub("", module.extra_repr())', '""',
           (CACHE,)),
    Mutant("UNET_SURGERY_NO_MAP_CACHE=0 switches the cache off", "graph/cache.py", 'in ("", "0")', 'in ("",)',
           (CACHE,)),
    Mutant("private config keys hashed", "graph/cache.py", 'if not k.startswith("_")', "if k", (CACHE,)),
    Mutant("buffers left out of the map key", "graph/cache.py",
           "own += [(n, tuple(b.shape)) for n, b in module.named_buffers(recurse=False)]", "own += []", (CACHE,)),
    # ------------------------------------------------------------------ passes/fouriscale/guidance.py (merged later)
    Mutant("FouriScale guidance borrows the uncond rows", "passes/fouriscale/guidance.py",
           "return BorrowedRows(source=total - 2 * rows, target=total - rows, rows=rows, total=total)",
           "return BorrowedRows(source=0, target=total - rows, rows=rows, total=total)", (FOURI_GUIDANCE,)),
    Mutant("FouriScale guidance expands [u, c] to [u, u, c]", "passes/fouriscale/guidance.py",
           "layout = ((0, MAIN), (1, MAIN), (1, GUIDANCE))", "layout = ((0, MAIN), (0, MAIN), (1, GUIDANCE))",
           (FOURI_GUIDANCE,)),
    Mutant("FouriScale guidance returns the cond branch", "passes/fouriscale/guidance.py",
           "uncond, guided = sample[:n], sample[2 * n :]", "uncond, guided = sample[:n], sample[n : 2 * n]",
           (FOURI_GUIDANCE,)),
    Mutant("amp_guidance window <= instead of <", "passes/fouriscale/guidance.py",
           "return step < entry.amp_stop_step * n / entry.steps", "return step <= entry.amp_stop_step * n / entry.steps",
           (FOURI_GUIDANCE,)),
    Mutant("amp_guidance window not rescaled to the step count", "passes/fouriscale/guidance.py",
           "return step < entry.amp_stop_step * n / entry.steps", "return step < entry.amp_stop_step",
           (FOURI_GUIDANCE,)),
    # ------------------------------------------------------------------ passes/rau_net: lower levels (merged later)
    Mutant("RAU-Net keeps no lower level's size", "passes/rau_net/__init__.py",
           "        for kept in range(first, deepest):", "        for kept in range(first, first):", (HID,)),
    Mutant("RAU-Net lower levels reduce too", "passes/rau_net/__init__.py",
           "link=_size_link(patch, role.level), reduce=False)", "link=_size_link(patch, role.level), reduce=True)",
           (HID,)),
]


def _tree(tmp: Path, tests_from: str | None) -> Path:
    """A copy of the checkout in ``tmp/repo``, with ``../shared`` beside it as for the checkout."""
    tree = tmp / "repo"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "unet_surgery", tree / "unet_surgery", ignore=ignore)
    if tests_from is None:
        shutil.copytree(ROOT / "tests", tree / "tests", ignore=ignore)
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_from, "tests"], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    for name in ("pyproject.toml", "recipes", "docs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tree / name)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (tmp / "shared").symlink_to(shared.resolve())
    return tree


def run_one(mutant: Mutant, timeout: int, tests_from: str | None) -> tuple[str, float, str]:
    """'killed', 'survived' or 'timeout' (counted as not killed), the seconds it took, and the
    first failing test."""
    with tempfile.TemporaryDirectory(prefix="unet-surgery-mutant-") as tmp:
        tree = _tree(Path(tmp), tests_from)
        target = tree / "unet_surgery" / mutant.file
        text = target.read_text()
        if text.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: {mutant.old!r} occurs {text.count(mutant.old)} times in {mutant.file}")
        target.write_text(text.replace(mutant.old, mutant.new))
        # CI=1: a test whose reference data is missing fails instead of skipping silently
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1", "CI": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        took = time.monotonic() - start
        if proc.returncode == 5:  # nothing collected: the selection is wrong, not the mutant
            raise SystemExit(f"{mutant.name}: no test collected from {mutant.tests}")
        failed = next((line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
                       if line.startswith(("FAILED ", "ERROR "))), "")
        return ("killed" if proc.returncode != 0 else "survived"), took, failed


def _load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}


def verdict_of(results: dict, label: str, name: str) -> dict | None:
    """``name``'s verdict in run ``label``; a kill carried over from an earlier run is marked so."""
    run = results["runs"][label]
    own = run["verdicts"].get(name)
    if own is not None or "carried_from" not in run:
        return own
    earlier = results["runs"][run["carried_from"]]["verdicts"].get(name)
    if earlier is None or earlier["verdict"] != "killed":
        return None
    return {**earlier, "verdict": "killed", "carried": True}


def write_report(results: dict) -> None:
    """``benchmarks/mutants.md``: every mutant with its verdict in each recorded run."""
    labels = sorted(results["runs"], key=lambda label: "carried_from" in results["runs"][label])  # before first
    lines = [
        "# Mutants: what the tests catch",
        "",
        "Written by `scripts/mutants.py` from `benchmarks/mutants.json`. Each mutant is one realistic,",
        "behaviour-changing edit of `unet_surgery/` (a flipped comparison, an off-by-one, a changed",
        "constant, a dropped term, swapped arguments), run against the test files that cover its module",
        "(`pytest -x`, `OMP_NUM_THREADS=1`, reference data laid out, `CI=1`). Equivalent mutants change no",
        "result on any accepted input; they are listed with the reason and left out of the kill rate.",
        "",
    ]
    for label in labels:
        run = results["runs"][label]
        found = {m.name: verdict_of(results, label, m.name) for m in MUTANTS if not m.equivalent}
        counted = [v for v in found.values() if v is not None]
        killed = sum(v["verdict"] == "killed" for v in counted)
        carried = sum(bool(v.get("carried")) for v in counted)
        lines.append(f"- **{label}**: {killed}/{len(counted)} behaviour-changing mutants killed "
                     f"({100 * killed / max(1, len(counted)):.0f} %)"
                     + (f", {carried} of them as in the {run['carried_from']} run (killing test unchanged, not re-run)"
                        if carried else "")
                     + f"; tests of {run['tests']}; {run['minutes']:.0f} min wall time (summed over runs in "
                     f"parallel) on {run['machine']}: "
                     + "; ".join(f"`{c}`" for c in run["commands"]))
    lines += ["", "| # | file | mutant | tests | " + " | ".join(labels) + " |",
              "|---|---|---|---|" + "---|" * len(labels)]
    for i, m in enumerate((m for m in MUTANTS if not m.equivalent), start=1):
        cells = []
        for label in labels:
            v = verdict_of(results, label, m.name)
            if v is None:
                cells.append("-")
                continue
            by = f" by `{v['by'].rsplit('/', 1)[-1]}`" if v["by"] else ""
            cells.append(("killed (as before)" if v.get("carried") else v["verdict"]) + by)
        files = ", ".join(t.rsplit("/", 1)[-1] for t in m.tests)
        lines.append(f"| {i} | `{m.file}` | {m.name} | {files} | " + " | ".join(cells) + " |")
    lines += ["", "## Equivalent mutants", "", "| file | mutant | why equivalent | " + " | ".join(labels) + " |",
              "|---|---|---|" + "---|" * len(labels)]
    for m in (m for m in MUTANTS if m.equivalent):
        cells = [results["runs"][label]["verdicts"].get(m.name, {"verdict": "-"})["verdict"] for label in labels]
        lines.append(f"| `{m.file}` | {m.name} | {m.equivalent} | " + " | ".join(cells) + " |")
    REPORT.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[],
                        help="run the mutants whose name contains this (repeatable; with --file: either)")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per mutant (default 400)")
    parser.add_argument("--file", action="append", default=[],
                        help="run the mutants of files starting with this, relative to unet_surgery/ (repeatable)")
    parser.add_argument("--tests-from", default=None, help="a git revision whose tests/ to run instead of the checkout's")
    parser.add_argument("--label", default=None, help="record the run under this name in benchmarks/mutants.json")
    parser.add_argument("--carry-killed-from", default=None, metavar="LABEL",
                        help="count a mutant this label has not run as killed when LABEL's run killed it (its "
                        "killing test is unchanged): re-run only survivors and mutants whose killing test changed")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies and compiles")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not (args.only or args.file) or any(s in m.name for s in args.only)
              or m.file.startswith(tuple(args.file))]
    if args.check:
        for m in chosen:
            text = (ROOT / "unet_surgery" / m.file).read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}")
            compile(text.replace(m.old, m.new), m.file, "exec")
        print(f"{len(chosen)} mutants apply ({sum(not m.equivalent for m in chosen)} behaviour-changing)")
        return 0
    verdicts: dict[str, dict] = {}
    start = time.monotonic()
    for m in chosen:
        verdict, took, by = run_one(m, args.timeout, args.tests_from)
        verdicts[m.name] = {"verdict": verdict, "seconds": round(took, 1), "by": by}
        tag = " (equivalent)" if m.equivalent else ""
        print(f"{verdict:8s} {took:6.0f}s  {m.file:26s} {m.name}{tag}  {by}", flush=True)
    counted = [m for m in chosen if not m.equivalent]
    killed = sum(verdicts[m.name]["verdict"] == "killed" for m in counted)
    print(f"{killed}/{len(counted)} behaviour-changing mutants killed ({100 * killed / max(1, len(counted)):.0f} %); "
          f"{len(chosen) - len(counted)} equivalent")
    if args.label:
        with open(Path(tempfile.gettempdir()) / "unet-surgery-mutants.lock", "w") as lock:  # one run at a time
            fcntl.flock(lock, fcntl.LOCK_EX)
            record(args, verdicts, time.monotonic() - start)
    return 0


def record(args: argparse.Namespace, verdicts: dict[str, dict], seconds: float) -> None:
    """Add a run's verdicts to its label in ``benchmarks/mutants.json`` and rewrite the report."""
    results = _load()  # read now: another run may have recorded its label meanwhile
    run = results["runs"].setdefault(args.label, {"verdicts": {}, "commands": [], "minutes": 0.0})
    run["verdicts"].update(verdicts)
    run["tests"] = f"commit {args.tests_from}" if args.tests_from else "this checkout"
    run["commands"].append("OMP_NUM_THREADS=1 python scripts/mutants.py " + shlex.join(sys.argv[1:]))
    if args.carry_killed_from:
        run["carried_from"] = args.carry_killed_from
    run["minutes"] += seconds / 60
    run["machine"] = f"{os.cpu_count()} CPU cores shared with other jobs"
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_report(results)


if __name__ == "__main__":
    raise SystemExit(main())
