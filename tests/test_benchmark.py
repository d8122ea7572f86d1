"""`make bench` at smoke size: every loop trains side by side on the same model and batches.

The full benchmark's numbers are not asserted here (no timed tests); this checks that the
comparison runs end to end and reports every loop and measurement.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOPS = ("(a) vlm_sweep Trainer", "(b) bare PyTorch loop", "(c) transformers.Trainer", "(d) trl.SFTTrainer")


@pytest.mark.slow
def test_quick_benchmark_prints_the_side_by_side_comparison(tmp_path: Path):
    script = ROOT / "scripts" / "benchmark.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--log-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    rows = {loop: next((ln for ln in out.splitlines() if loop in ln), None) for loop in LOOPS}
    assert all(rows.values()), f"missing loops in:\n{out}"
    for loop in LOOPS[:3]:  # our loop, the floor and transformers.Trainer always run; TRL may report why not
        assert re.search(r"\d+\s+\d+-\d+", rows[loop]), rows[loop]
    # The loops compared trained the same model on the same batches.
    assert "trained on different tokens" not in out
    losses = re.search(r"first-step loss .*: \(a\) ([\d.]+), \(b\) ([\d.]+)", out)
    assert losses and losses.group(1) == losses.group(2), out
    # Memory: both losses and both checkpointing settings measured; checkpointing leaves the losses alone.
    for row in ("old loss", "new loss", "decoder only", "activation checkpointing off", "activation checkpointing on"):
        assert re.search(re.escape(row) + r".*\s\d+\s+\d+\s+\d+\s+[\d.]+$", out, re.M), f"{row} missing:\n{out}"
    assert re.search(r"activation checkpointing: same losses .* ok", out), out
    assert "Checks" in out
