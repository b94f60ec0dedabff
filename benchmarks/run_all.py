"""Run every benchmark and write one report (Markdown + JSON) for this machine.

    python benchmarks/run_all.py                  # writes benchmarks/report.md and report.json
    python benchmarks/run_all.py --quick          # smaller sizes, a few minutes
    python benchmarks/run_all.py --only map,redilate

Each benchmark is its own script (run alone for details); each measures its comparison side by
side in one process and reports a ratio, so figures from a loaded machine still compare. On a
GPU machine the same command records absolute GPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, what it compares)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "redilate": ("bench_redilate.py", "re-dilated conv vs plain conv (integer and fractional factors)"),
    "unet_step": ("bench_unet_step.py", "patched vs unpatched SD1.5 UNet step at the same size"),
    "guidance": ("bench_guidance.py", "noise-damped guidance: one batch-3 call vs the published four evaluations"),
    "scale_fusion": ("bench_scale_fusion.py", "fused (batched) scale-fusion attention vs a one-call-per-window loop"),
    "patchwise_memory": ("bench_patchwise_memory.py", "patch-wise vs whole-latent step and decode peak memory at 1024-4096 px (tiny configs)"),
    "dispersion_memory": ("bench_dispersion_memory.py", "dispersion: bytes held (on the fly vs stored kernels vs the published deep copies), step time, adapter sizes"),
    "map": ("bench_map.py", "cold map (symbolic vs static-first export) and apply time cold vs cached, SD1.5 and SDXL on meta"),
    "export": ("bench_export.py", "export and load times, adapter size vs full checkpoint"),
    "compile": ("bench_compile.py", "torch.compile: compilations over a schedule, compiled patched vs compiled plain step"),
    "generate": ("bench_generate.py", "unet-surgery generate: images per minute, one and two processes"),
}


def machine() -> dict[str, str]:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def accepts(script: Path, flag: str) -> bool:
    text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    return flag in text


def run_one(name: str, quick: bool) -> dict:
    script = HERE / BENCHMARKS[name][0]
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "out.json"
        cmd = [sys.executable, str(script), "--json", str(out_json)]
        if quick and accepts(script, "--quick"):
            cmd.append("--quick")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        data = json.loads(out_json.read_text()) if out_json.exists() else None
    return {
        "name": name,
        "script": f"benchmarks/{script.name}",
        "command": " ".join(["python", f"benchmarks/{script.name}", *cmd[2:]]).replace(str(out_json), "OUT.json"),
        "compares": BENCHMARKS[name][1],
        "ok": proc.returncode == 0,
        "seconds": round(elapsed, 1),
        "markdown": proc.stdout.strip(),
        "error": proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else None,
        "data": data,
    }


def render(results: list[dict], info: dict[str, str], quick: bool) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"Produced by `python benchmarks/run_all.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}. How to read it: `docs/benchmarks.md`.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
    ]
    for r in results:
        lines += [f"## {r['name']}: {r['compares']}", "", f"`{r['command']}` ({r['seconds']} s)", ""]
        if r["ok"]:
            lines += [r["markdown"], ""]
        else:
            lines += [f"**failed**: {r['error']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes where a benchmark offers them")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=HERE / "report", help="path stem of the .md and .json")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    info = machine()
    results = []
    for name in names:
        print(f"[{name}] {BENCHMARKS[name][1]} ...", flush=True)
        result = run_one(name, args.quick)
        print(f"[{name}] {'ok' if result['ok'] else 'FAILED: ' + str(result['error'])} in {result['seconds']} s", flush=True)
        results.append(result)
    args.out.with_suffix(".md").write_text(render(results, info, args.quick) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "quick": args.quick, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
