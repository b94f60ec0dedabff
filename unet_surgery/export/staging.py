"""Write an export folder so that an interrupted write never leaves a loadable half.

Everything is written into a hidden sibling folder; only when every file is complete is the
folder renamed onto the target (one atomic ``rename``). An existing earlier export at the
target is moved aside first and deleted after; a non-empty folder that is not an export of
ours is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from unet_surgery.errors import SurgeryError

# Files whose presence marks a folder as a completed export (written last, renamed in whole).
MARKERS = ("adapter.json", "manifest.json")


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``target``, on failure it vanishes."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SurgeryError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not any((target / m).is_file() for m in MARKERS):
        raise SurgeryError(f"{target} is a non-empty folder that is not an unet-surgery export; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield stage
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(stage, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
