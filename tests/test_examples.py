"""The example scripts run end to end."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mask_demo_writes_its_figure(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mask_demo.py"), "--out", str(out), "--photos", "cat", "coffee"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saliency_figure_writes_its_figure(tmp_path):
    out = tmp_path / "saliency.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "saliency_figure.py"), "--out", str(out), "--photos", "cat"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
