"""Exports write only into folders they own, and a killed export leaves nothing behind after
the next run. The folders below are the ones the red-team pass lost data in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from unet_surgery.cli import main
from unet_surgery.errors import SurgeryError
from unet_surgery.export.staging import STAGE_TAG, export_files, staged_folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export_into(folder: Path, files: dict[str, str]) -> None:
    """An export as the writers make one: files, then ``manifest.json`` listing them all."""
    with staged_folder(folder) as stage:
        for name, text in files.items():
            (stage / name).write_text(text)
        manifest = {"format": "unet-surgery-pt2", "note": files.get("manifest.json", "")}
        manifest["export_files"] = export_files(stage, "manifest.json")
        (stage / "manifest.json").write_text(json.dumps(manifest))


def manifest_note(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["note"]


def web_app(folder: Path) -> None:
    (folder / "src").mkdir(parents=True)
    (folder / "index.html").write_text("<html></html>")
    (folder / "src" / "app.js").write_text("run()")


FOREIGN = {
    "web app": web_app,
    "web app with a manifest.json": lambda f: (web_app(f), (f / "manifest.json").write_text('{"name": "my app"}')),
    "a folder holding adapter.json only from elsewhere": lambda f: (f.mkdir(), (f / "adapter.json").write_text("{}")),
    "a pt2 manifest listing a subfolder": lambda f: (web_app(f), (f / "manifest.json").write_text(
        json.dumps({"format": "unet-surgery-pt2", "export_files": ["index.html", "src", "manifest.json"]}))),
    "a pt2 manifest without export_files": lambda f: (web_app(f), (f / "manifest.json").write_text(
        json.dumps({"format": "unet-surgery-pt2"}))),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_folders_are_refused_and_kept(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "out"
    FOREIGN[kind](target)
    before = tree(target)
    with pytest.raises(SurgeryError, match="refusing to overwrite"):
        export_into(target, {"manifest.json": "{}"})
    assert tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging debris either


def test_notes_added_to_an_earlier_export_survive(tmp_path: Path) -> None:
    target = tmp_path / "out"
    export_into(target, {"manifest.json": "1"})
    export_into(target, {"manifest.json": "2", "phase_0.pt2": "x"})  # an export of ours is replaced
    assert manifest_note(target) == "2" and sorted(p.name for p in target.iterdir()) == ["manifest.json", "phase_0.pt2"]
    (target / "NOTES.md").write_text("my notes")
    with pytest.raises(SurgeryError, match=r"NOTES\.md"):
        export_into(target, {"manifest.json": "3"})
    assert (target / "NOTES.md").read_text() == "my notes" and manifest_note(target) == "2"


def test_a_symlinked_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("k")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SurgeryError, match="symbolic link"):
        export_into(tmp_path / "link", {"manifest.json": "{}"})
    assert (tmp_path / "real" / "keep.txt").read_text() == "k"


def test_cli_export_into_a_web_app_exits_2_and_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unet_surgery.presets import build_unet

    checkpoint = tmp_path / "unet"
    build_unet("sd15", size="tiny", device="cpu").save_pretrained(str(checkpoint))
    target = tmp_path / "site"
    web_app(target)
    (target / "manifest.json").write_text("{}")
    before = tree(target)
    code = main(["export", "-f", "adapter", "-r", "scalecrafter-sd15-2048x2048-disperse-active", "-o", str(target), "-q", str(checkpoint)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "refusing to overwrite" in err[0]
    assert tree(target) == before


KILLED = """
import sys, time
from pathlib import Path
from unet_surgery.export.staging import staged_folder
with staged_folder(Path(sys.argv[1])) as stage:
    (stage / "manifest.json").write_text("half")
    print(stage, flush=True)
    time.sleep(60)
"""


def test_kill_9_leaves_debris_that_the_next_run_removes(tmp_path: Path) -> None:
    target = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    debris = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILLED, str(target)], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        stage = Path(proc.stdout.readline().strip())
        assert stage.is_dir() and (stage / STAGE_TAG).is_file()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        debris.append(stage)
        assert [d.exists() for d in debris] == [False] * (len(debris) - 1) + [True]  # each run cleans the last
    assert not target.exists()  # the target itself is never partial
    unrelated = tmp_path / ".out.123-0123456789abcdef.partial"  # right name, but not made by us
    unrelated.mkdir()
    (unrelated / "keep").write_text("k")
    export_into(target, {"phase_0.pt2": "ok"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.123-0123456789abcdef.partial", "out"])
    assert (unrelated / "keep").read_text() == "k"


FULL_DISK = """
import sys
from pathlib import Path
from unet_surgery.cli import main
from unet_surgery.export.staging import staged_folder
target = Path(sys.argv[1])
try:
    with staged_folder(target / "export") as stage:
        (stage / "manifest.json").write_bytes(b"x" * 100_000)
except OSError as exc:
    print("export:", exc.strerror, file=sys.stderr)
sys.exit(main(["disperse", "-o", str(target / "r.safetensors")]))
"""


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    import resource

    def limit() -> None:  # files may not grow past 10 kB: every write above fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "r.safetensors").mkdir()  # disperse cannot write there either way
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=300)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(err) == 2, err
    assert err[0] == "export: File too large" and "error:" in err[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # no staging folder left
