"""The foundation commands: models, synth, predict --local, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuroexplain import RESEARCH_NOTICE
from neuroexplain.cli.main import main


def test_models_json_lists_bundled_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--local", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["lesion"]["classes"] == ["healthy", "lesion"]
    assert rows["atrophy"]["classes"] == ["healthy", "atrophy"]
    assert rows["lesion"]["grid"]["shape"] == [80, 96, 80]
    assert rows["lesion"]["version"] == "1.1.0"


def test_synth_then_predict_json_with_a_failing_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--model", "lesion", "-n", "2", "-o", str(tmp_path)]) == 0
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["label"] for r in index] == ["healthy", "lesion"]
    assert all((tmp_path / r["mask"]).exists() for r in index)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"not really gzip")
    capsys.readouterr()

    scans = [str(tmp_path / r["scan"]) for r in index] + [str(broken)]
    code = main(["predict", *scans, "--model", "lesion", "--local", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one scan failed
    assert [line["scan"] for line in lines] == scans
    for line in lines[:2]:
        assert line["model"] == "lesion" and line["model_version"] == "1.1.0"
        assert set(line["probabilities"]) == {"healthy", "lesion"}
        assert line["predicted_class"] in ("healthy", "lesion")
        assert len(line["logits"]) == 2 and line["cached"] is False and line["notice"] == RESEARCH_NOTICE
    assert lines[2]["error"]["code"] == "INVALID_ARGUMENT"  # the gRPC status name, the same with --local
    assert "gzip" in lines[2]["error"]["message"]


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.nii"
    result = subprocess.run(
        [sys.executable, "-m", "neuroexplain.cli.main", "predict", str(missing), "--model", "nope", "--local"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "model 'nope' not found" in result.stderr and "Traceback" not in result.stderr


def test_synth_rejects_out_of_range_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--model", "lesion", "-n", "0", "-o", str(tmp_path)]) == 1
    assert "expected 1 to 10000" in capsys.readouterr().err


def _one_line_failure(args: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "neuroexplain.cli.main", *args], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line and line != RESEARCH_NOTICE]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_directory_given_as_a_scan_is_one_line(tmp_path: Path) -> None:
    err = _one_line_failure(["predict", str(tmp_path), "--model", "lesion", "--local"])
    assert "holds no DICOM files" in err and "NIfTI/MGH file" in err


def test_an_unwritable_output_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = _one_line_failure(["synth", "--model", "lesion", "-n", "1", "-o", str(blocker / "sub")])
    assert "cannot access" in err
