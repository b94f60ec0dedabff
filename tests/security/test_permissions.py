"""A file the process may not read is reported as "Permission denied", never as missing.

safetensors reports every open failure as "No such file or directory"; the loaders open the
file themselves first so the OS's own reason reaches the user. As root every file is
readable, so the check runs in a child process that drops to an unprivileged uid after its
imports (as a normal user it only needs ``chmod 000``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_CHILD = r"""
import os, sys
import safetensors, safetensors.torch
import unet_surgery.cli as cli
import unet_surgery.cli.inspect_cmd, unet_surgery.loading.weights, unet_surgery.loading.resolve
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def locked_file():
    folder = Path(tempfile.mkdtemp(prefix="unet-surgery-perm-"))  # not under pytest's 0700 root
    try:
        folder.chmod(0o755)
        weights = folder / "model.safetensors"
        weights.write_bytes(b"not read anyway")
        weights.chmod(0o000)
        yield weights
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_unreadable_checkpoint_is_permission_denied(locked_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD, "inspect", str(locked_file)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1
    assert "Permission denied" in lines[0] and str(locked_file) in lines[0]
    assert "No such file" not in lines[0]
