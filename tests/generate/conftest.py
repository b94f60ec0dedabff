"""Tiny SD1.5 and SDXL pipeline folders (random weights, real tokenizers and text encoders) on disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.generation.tiny_pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from unet_surgery.generation.tiny_pipeline import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


def clean_env() -> dict[str, str]:
    """The environment for a generate subprocess: this checkout first on the path, and no
    thread or MKL settings inherited, so the command's own choices are what is tested."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def generate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "unet_surgery", "generate", *args]


def accelerate_command(processes: int, *args: str) -> list[str]:
    """``accelerate launch`` of the same command. On a machine without GPUs ``--multi_gpu`` is the
    launcher that starts several processes (torch.distributed.run); ``generate`` then asks
    accelerate for its CPU backend, gloo."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "unet_surgery", "generate", *args,
    ]


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=timeout, check=False)
