"""``unet-surgery disperse``: writes a bit-exact transform, fails with one clear line."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from unet_surgery.cli import disperse_cmd
from unet_surgery.errors import TransformError
from unet_surgery.ops.dispersion import TransformParams, dispersion_transform, load_transform


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="unet-surgery")
    disperse_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_writes_the_transform_bit_exact(tmp_path, capsys):
    out = tmp_path / "R.safetensors"
    rc = _run(
        [
            "disperse",
            "--small",
            "3",
            "--large",
            "5",
            "--scale",
            "2",
            "--eta",
            "0.05",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "25x9" in line and str(out) in line
    r, params = load_transform(out)
    assert params == TransformParams(3, 5, 2, 3, 0.05)
    assert r.tobytes() == np.ascontiguousarray(dispersion_transform()).tobytes()


def test_seven_by_seven_with_input_size(tmp_path):
    out = tmp_path / "R7.safetensors"
    assert _run(["disperse", "--large", "7", "--input-size", "4", "-o", str(out)]) == 0
    r, params = load_transform(out)
    assert r.shape == (49, 9) and params.input_size == 4 and params.large == 7


@pytest.mark.parametrize(
    "argv",
    [
        ["--small", "4"],
        ["--large", "3"],
        ["--scale", "0"],
        ["--eta", "0"],
        ["--input-size", "0"],
    ],
)
def test_bad_parameters_raise_transform_error_and_write_nothing(tmp_path, argv):
    out = tmp_path / "R.safetensors"
    with pytest.raises(TransformError):
        _run(["disperse", *argv, "-o", str(out)])
    assert not out.exists()


def test_output_suffix_checked(tmp_path):
    with pytest.raises(TransformError, match="safetensors"):
        _run(["disperse", "-o", str(tmp_path / "R.mat")])


def test_through_the_dispatcher(tmp_path, capsys, monkeypatch):
    import unet_surgery.cli as cli
    from unet_surgery.cli import main

    # Exercise only this sub-command's registration, whatever else the dispatcher lists.
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("unet_surgery.cli.disperse_cmd",))
    out = tmp_path / "R.safetensors"
    assert main(["disperse", "-o", str(out)]) == 0
    assert Path(out).is_file()
    assert main(["disperse", "--eta", "-1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unet-surgery disperse: error:") and "eta" in err[0]
