"""docs/tutorial.md runs as written: every ```bash and ```python block, in order, offline.

The tutorial promises that a fresh install can follow it with no network on the shipped toy, so
this test does what a reader does: shell blocks through ``bash`` with this environment's
``unet-surgery`` first on PATH, Python blocks exec'd in one namespace, all in an empty folder.
Blocks after the ``<!-- tutorial-test: stop`` marker need downloaded weights; they are only
compiled (shell blocks: ``bash -n``) so that a typo there is caught too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"
STOP_MARKER = "<!-- tutorial-test: stop"
FENCE = re.compile(r"^```(bash|python)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# What the tutorial says it writes (sections 1, 3, 4 and 5).
WRITTEN = (
    "toy-unet/config.json",
    "toy-unet/diffusion_pytorch_model.safetensors",
    "toy-unet/class_embedding.safetensors",
    "toy-unet/toy.json",
    "deep-64.yaml",
    "toy-unet-64/config.json",
    "toy-unet-64/diffusion_pytorch_model.safetensors",
    "toy-unet-64/recipe.yaml",
    "toy-unet-64/adapter.safetensors",
    "toy-unet-64/adapter.json",
    "toy-adapter/recipe.yaml",
    "toy-adapter/adapter.safetensors",
    "toy-adapter/adapter.json",
    "tutorial-64.png",
)


def tutorial_blocks() -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(blocks to run, blocks after the stop marker) as (language, code, line) in page order."""
    text = TUTORIAL.read_text(encoding="utf-8")
    stop = text.find(STOP_MARKER)
    assert stop > 0, f"{TUTORIAL} lost its {STOP_MARKER!r} marker"
    run, rest = [], []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        (run if match.start() < stop else rest).append((match.group(1), match.group(2), line))
    return run, rest


def test_tutorial_has_the_promised_steps():
    run, _ = tutorial_blocks()
    shell = "\n".join(code for lang, code, _ in run if lang == "bash")
    python = "\n".join(code for lang, code, _ in run if lang == "python")
    for command in ("unet-surgery toy export", "unet-surgery inspect", "unet-surgery apply",
                    "--out", "unet-surgery export"):
        assert command in shell, command
    for call in ("load_unet(", "map_unet(", "auto_recipe(", "apply(", "sample(", ".remove()"):
        assert call in python, call


def test_blocks_after_the_marker_compile(tmp_path):
    _, rest = tutorial_blocks()
    assert rest, "the real-pipeline section has no code blocks"
    for lang, code, line in rest:
        if lang == "python":
            compile(code, f"{TUTORIAL.name}:{line}", "exec")
        else:
            script = tmp_path / f"block_{line}.sh"
            script.write_text(code, encoding="utf-8")
            subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_tutorial_runs_offline(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the tutorial touched the network")

    # In-process blocks must not connect; shell blocks get no proxy and HF offline flags.
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)

    run, _ = tutorial_blocks()
    namespace: dict[str, object] = {"__name__": "__tutorial__"}
    timings = []
    for lang, code, line in run:
        start = time.perf_counter()
        if lang == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                    capture_output=True, text=True)
            assert result.returncode == 0, (
                f"{TUTORIAL.name}:{line}: bash block failed ({result.returncode})\n"
                f"{code}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
            )
        else:
            exec(compile(code, f"{TUTORIAL.name}:{line}", "exec"), namespace)
        timings.append(f"{TUTORIAL.name}:{line} {lang} {time.perf_counter() - start:.1f} s")

    missing = [name for name in WRITTEN if not (tmp_path / name).is_file()]
    assert not missing, f"the tutorial did not write {missing}"
    with capsys.disabled():
        print("\n" + "\n".join(timings))
