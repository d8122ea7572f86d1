"""`generate --video`: answers on a video-capable family, one line and exit 2 on a family without video."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CACHE, FAMILIES, ROOT
from vlm_sweep.data.fixture_parts import write_video
from vlm_sweep.models.registry import get_family
from vlm_sweep.models.tiny import build_tiny_model

# Every family's tiny config -> its family (= its tiny recipe, see conftest.FAMILIES).
TINY = {name: OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml").family for name in FAMILIES}


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_sweep.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(TINY))
def test_generate_video_answers_or_says_the_family_takes_none(model, tmp_path):
    model_dir = build_tiny_model(TINY[model], CACHE / "models" / model)
    clip = write_video(tmp_path / "clip.mp4")
    proc = _generate("--checkpoint-path", str(model_dir), "--video", str(clip), "--prompt", "What happens?",
                     "--max-new-tokens", "4")
    if get_family(TINY[model]).supports_video:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip()
        return
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: --video")
    assert TINY[model] in error[0] and "qwen2_5_vl" in error[0]  # names the model's family and the capable ones
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"video": str(clip), "prompt": "hi"}) + "\n")
    proc = _generate("--checkpoint-path", str(model_dir), "--input-jsonl", str(rows), "--max-new-tokens", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0].startswith(f"error: {rows} row 2 has a video")
