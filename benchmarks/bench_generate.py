"""Images per minute of ``unet-surgery generate`` on a tiny SD1.5 pipeline: one process against
two under ``accelerate launch``, side by side.

    python benchmarks/bench_generate.py                    # writes benchmarks/generate_report.{md,json}
    python benchmarks/bench_generate.py --images 4,12 --steps 10 --size 64

Each configuration runs the real command twice in fresh subprocesses, with ``n1`` and ``n2``
images; the steady rate is ``(n2 - n1) / (t2 - t1)`` images per second, so loading the pipeline
and starting the processes cancel out. The end-to-end rate of the larger run is reported too.
Configurations: one process with every core, one process with one thread, and as many
processes as cores with one thread each (two on the project's machine). On a GPU machine the
processes are one per GPU (``--multi_gpu``) and the default thread settings are kept.
The files of the one-thread runs and the multi-process runs are compared byte for byte.
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

import torch

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(processes: int, threads: int | None, folder: Path, out: Path, images: int, steps: int,
             size: int) -> list[str]:
    args = [str(folder), "--size", str(size), "--prompt", "a lighthouse on a cliff", "--seed", f"0-{images - 1}",
            "--steps", str(steps), "--recipe", "none", "--out", str(out), "--quiet"]
    if threads is not None:
        args += ["--threads", str(threads)]
    if processes == 1:
        return [sys.executable, "-m", "unet_surgery", "generate", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "unet_surgery", "generate", *args]


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=_env(), check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def measure(name: str, processes: int, threads: int | None, folder: Path, work: Path, counts: tuple[int, int],
            steps: int, size: int) -> dict:
    n1, n2 = counts
    t1 = _timed(_command(processes, threads, folder, work / f"{name}-{n1}", n1, steps, size))
    t2 = _timed(_command(processes, threads, folder, work / f"{name}-{n2}", n2, steps, size))
    return {
        "config": name, "processes": processes, "threads_per_process": threads or torch.get_num_threads(),
        "images": [n1, n2], "wall_s": [round(t1, 2), round(t2, 2)],
        "steady_images_per_min": round(60 * (n2 - n1) / max(t2 - t1, 1e-9), 1),
        "end_to_end_images_per_min": round(60 * n2 / t2, 1),
    }


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="4,16", help="n1,n2 images per run (default 4,16)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="pixels per side (tiny SD1.5 native: 64)")
    parser.add_argument("--json", metavar="PATH", default=str(HERE / "generate_report.json"))
    parser.add_argument("--markdown", metavar="PATH", default=str(HERE / "generate_report.md"))
    args = parser.parse_args()
    n1, n2 = (int(v) for v in args.images.split(","))
    gpus = torch.cuda.device_count()
    many = max(2, gpus) if gpus else max(2, os.cpu_count() or 2)
    from unet_surgery.generation.tiny_pipeline import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = save_tiny_pipeline(work / "tiny-sd15", "sd15")
        if gpus:
            configs = [("1 process", 1, None), (f"{many} processes", many, None)]
        else:
            configs = [("1 process, all threads", 1, None), ("1 process, 1 thread", 1, 1),
                       (f"{many} processes, 1 thread each", many, 1)]
        rows = [measure(name, p, t, folder, work, (n1, n2), args.steps, args.size) for name, p, t in configs]
        one_thread, multi = rows[-2]["config"], rows[-1]["config"]
        identical = same_files(work / f"{one_thread}-{n2}", work / f"{multi}-{n2}")
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if gpus else None, "gpus": gpus},
        "settings": {"pipeline": "tiny SD1.5 (random weights)", "size": args.size, "steps": args.steps,
                     "images": [n1, n2], "recipe": "none"},
        "rows": rows,
        "identical_files": {"compared": [one_thread, multi], "identical": identical},
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    base = rows[0]["steady_images_per_min"]
    lines = [
        "# `unet-surgery generate`: images per minute, one process and several",
        "",
        f"Tiny SD1.5 pipeline (random weights), {args.size}x{args.size} px, {args.steps} steps, no recipe; "
        f"runs of {n1} and {n2} images. Machine: {report['machine']['platform']}, {os.cpu_count()} CPU cores"
        + (f", {gpus} x {report['machine']['gpu']}" if gpus else "") + ".",
        "Steady rate = (n2 - n1) / (t2 - t1), start-up cancelled; end-to-end = n2 / t2.",
        "",
        "| configuration | processes | threads each | steady img/min | vs first row | end-to-end img/min | wall s (n1, n2) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['processes']} | {row['threads_per_process']} | {row['steady_images_per_min']} | "
            f"{row['steady_images_per_min'] / base:.2f}x | {row['end_to_end_images_per_min']} | "
            f"{row['wall_s'][0]}, {row['wall_s'][1]} |"
        )
    lines += ["", f"Files of `{one_thread}` and `{multi}` byte-identical: **{identical}**.", ""]
    Path(args.markdown).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
