"""``unet-surgery inspect``: the help says what the command does; probe maps print unknowns as ?."""

from __future__ import annotations

import pytest

from unet_surgery.cli import build_parser, main
from unet_surgery.graph import UNetMap


def _inspect_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["inspect"].format_help()  # type: ignore[union-attr]


def test_help_matches_behaviour() -> None:
    text = " ".join(_inspect_help().split())
    assert "--list" not in text  # no such option
    assert "auto (default" in text and "falling back to probe" in text
    assert "sd15" in text  # the presets are named where the help used to point at --list
    assert build_parser().parse_args(["inspect", "sd15"]).method == "auto"


def test_probe_table_prints_unknown_counts_as_question_marks() -> None:
    from tests.conftest import preset_map

    exported = preset_map("sd15", "tiny")
    probed = UNetMap.from_dict({**exported.to_dict(), "method": "probe", "skips": [],
                                "unknown_fields": ["ConvRecord.stage", "AttentionRecord.stage", "skips"],
                                "convs": [{**c, "stage": None} for c in exported.to_dict()["convs"]]})
    table = probed.table()
    assert "skip concatenations: ?" in table
    rows = [line.split() for line in table.splitlines() if line[:1].isdigit()]
    assert rows and all(r[1:4] == ["?", "?", "?"] and r[-1] == "?" for r in rows)
    assert "?" not in exported.table().split("skip concatenations:")[1].splitlines()[0]


@pytest.mark.slow
def test_inspect_probe_runs(capsys) -> None:
    assert main(["inspect", "sd15", "--method", "probe"]) == 0
    out = capsys.readouterr().out
    assert "mapped by probe" in out and "skip concatenations: ?" in out
