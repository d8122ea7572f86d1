"""Shared test fixtures: composed configs, the built tiny models, a scratch MLflow store.

Tiny models and synthetic data are built once into a repo-local cache
(.cache/vlm_sweep, git-ignored) and reused across tests and runs, exactly as a
user's cache would be.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLM_SWEEP_CACHE", str(ROOT / ".cache" / "vlm_sweep"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 cores: one thread per process avoids oversubscription when jobs run side by side.
os.environ.setdefault("OMP_NUM_THREADS", "1")
CACHE = Path(os.environ["VLM_SWEEP_CACHE"])


def _tiny_family_configs() -> List[str]:
    """Every model family, as its tiny stand-in's config (conf/model/<name>.yaml whose ``tiny_recipe``
    is the family itself; variants such as a bigger demo build are not families)."""
    from omegaconf import OmegaConf

    configs = {p.stem: OmegaConf.load(p) for p in sorted((ROOT / "conf" / "model").glob("*.yaml"))}
    return [name for name, c in configs.items() if c.get("tiny_recipe") and c.tiny_recipe == c.family]


# The family contract tests are parametrised over this one list, read from conf/model/: a new family's
# tiny config makes it a row of every contract test (test_tiny_models checks its expectations row).
FAMILIES = _tiny_family_configs()


def compose(overrides: List[str] | None = None):
    """The run config exactly as launch.py composes it (without the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlm_sweep.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def tiny_processor(recipe: str):
    """The processor of a tiny model (``recipe``: gemma3, qwen2_5_vl, nemotron_vl), built if needed,
    loaded with the registry's processor settings as training loads it."""
    from transformers import AutoProcessor

    from vlm_sweep.models.registry import get_family
    from vlm_sweep.models.tiny import build_tiny_model

    model_dir = build_tiny_model(recipe, CACHE / "models" / f"tiny_{recipe}")
    return AutoProcessor.from_pretrained(model_dir, **get_family(recipe).processor_kwargs)


@pytest.fixture(scope="module")
def private_hf_datasets_cache(tmp_path_factory):
    """Keep the Arrow cache of a module's throw-away data sets out of the user's HF cache."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        yield


@pytest.fixture(scope="session")
def frames(tmp_path_factory):
    """Four frames decoded from a real 16-frame mp4 (as the LLaVA-Video loader decodes them)."""
    from vlm_sweep.data.fixture_parts import write_video
    from vlm_sweep.data.media import load_video_frames

    clip = write_video(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=16, fps=8)
    return load_video_frames(clip, num_frames=4)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    from vlm_sweep.models.tiny import build_tiny_model

    return build_tiny_model("gemma3", CACHE / "models" / "tiny_gemma3")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    from vlm_sweep.models.tiny import build_tiny_model

    return build_tiny_model("qwen2_5_vl", CACHE / "models" / "tiny_qwen2_5_vl")


@pytest.fixture(scope="session")
def receipts_dir() -> Path:
    from vlm_sweep.data.synthetic_receipts import generate_synthetic_receipts

    cfg = compose()
    return generate_synthetic_receipts(cfg.dataset.path, **dict(cfg.dataset.synthetic))


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run_launch(args: List[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run launch.py in a subprocess, as a user would."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def skip_or_fail_without_slurm(reason: str) -> None:
    """Skip a SLURM test with its reason; in CI (VLM_SWEEP_REQUIRE_SLURM=1) fail instead."""
    if os.environ.get("VLM_SWEEP_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (VLM_SWEEP_REQUIRE_SLURM=1) but {reason}")
    pytest.skip(reason)
