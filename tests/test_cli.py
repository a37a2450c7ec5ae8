"""The fewstep console script: LightningCLI behaviour and the tool subcommands."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main

ROOT = Path(__file__).parents[1]


def test_shapes_tool_from_config(tmp_path, capsys):
    main(
        [
            "shapes",
            "-c",
            str(ROOT / "configs/shapes/preview.yaml"),
            "--out",
            str(tmp_path),
            "--num_samples",
            "6",
            "--num_scored",
            "30",
        ]
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["clean"]["overall"] >= 0.99
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert len((tmp_path / "images/metadata.jsonl").read_text().splitlines()) == 6
    assert '"overall"' in capsys.readouterr().out


def test_console_script_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "fewstep.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("fit", "validate", "test", "predict"):
        assert command in out


def test_bad_tool_argument_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["shapes", "--resolution", "abc"])
    assert "resolution" in capsys.readouterr().err
