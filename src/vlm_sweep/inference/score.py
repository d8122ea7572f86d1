"""Generate answers for data set records and score them with the task's metric.

``evaluate_samples`` is shared by the evaluate command and the training loop
(``eval.every_steps``): under data parallelism each rank generates its shard and the
predictions are gathered, so every rank returns the same metrics. ``score_checkpoint`` is
the evaluate command's whole job: the config is composed with Hydra from the conf/ the
package ships (``vlm_sweep.config.paths.conf_dir``), so it works from any directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.data.sets import get_spec
from vlm_sweep.inference.generate import SamplingConfig, generate, prompt_part

Metrics = Dict[str, float]
Rows = List[Dict[str, Any]]


def evaluate_samples(model: Any, processor: Any, samples: Sequence[Any], record_format: str,
                     sampling: SamplingConfig, batch_size: int = 4, rank: int = 0,
                     world_size: int = 1, media_kwargs: Any = None) -> Tuple[Metrics, Rows]:
    """(metrics, per-record rows) over ``samples`` (each with .record_id and .conversation)."""
    mine = list(samples)[rank::world_size]
    rows: Rows = []
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        answers = generate(model, processor, [prompt_part(s.conversation) for s in batch], sampling,
                           media_kwargs=media_kwargs)
        for sample, answer in zip(batch, answers):
            rows.append({"record_id": sample.record_id, "prediction": answer,
                         "reference": assistant_texts(sample.conversation)[-1]})
    if world_size > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r["record_id"])
    metrics = get_spec(record_format).metric([r["prediction"] for r in rows], [r["reference"] for r in rows])
    return metrics, rows


def _overridden_keys(overrides: List[str], prefix: str) -> List[str]:
    """Keys under ``prefix.`` that the command line sets (``dataset.split=test`` -> ``split``)."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")]
    return [k[len(prefix) + 1:] for k in keys if k.startswith(f"{prefix}.")]


def with_run_dataset(cfg: Any, overrides: List[str], run_config: Optional[dict]) -> Any:
    """``cfg`` whose data set settings are the run's (path, format, pixel budget, ...).

    A run trained on ``dataset.path=DIR`` is evaluated on DIR, not on the hub id its dataset
    config names. ``dataset=<name>`` on the command line picks another data set (nothing is
    reused); ``dataset.<key>=...`` overrides win over the run's value for that key.
    """
    from omegaconf import OmegaConf, open_dict

    if not run_config or "dataset" not in run_config or any(o.startswith("dataset=") for o in overrides):
        return cfg
    known = set(cfg.dataset.keys())
    run_dataset = OmegaConf.create({k: v for k, v in run_config["dataset"].items() if k in known})
    merged = OmegaConf.merge(cfg.dataset, run_dataset)
    for key in _overridden_keys(overrides, "dataset"):  # the command line's value, as Hydra composed it
        with open_dict(merged):
            OmegaConf.update(merged, key, OmegaConf.select(cfg.dataset, key), merge=False)
    cfg.dataset = merged
    return cfg


def compose_config(overrides: List[str], run_config: Optional[dict]) -> Any:
    """The composed config; the data set defaults to the checkpoint's own, with its settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlm_sweep.config.paths import conf_dir
    from vlm_sweep.config.schema import register_configs

    conf = conf_dir()
    composed = list(overrides)
    if run_config and not any(o.startswith("dataset=") for o in overrides):
        name = run_config["dataset"]["name"]
        if (conf / "dataset" / f"{name}.yaml").exists():
            composed = [f"dataset={name}", *overrides]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=composed)
    return with_run_dataset(cfg, overrides, run_config)


def load_eval_samples(dataset_cfg: Any, max_samples: Optional[int]) -> List[Any]:
    """The split's usable samples (bad records skipped as in training), the first ``max_samples``."""
    from vlm_sweep.data.datasets import ConversationDataset, load_split

    split = load_split(dataset_cfg, dataset_cfg.split)
    if max_samples is not None:
        split = split.select(range(min(max_samples, len(split))))
    dataset = ConversationDataset(split, dataset_cfg, dataset_cfg.split)
    return [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]


def format_table(results: Dict[str, Metrics]) -> str:
    """Metrics as rows, models (``base``, ``fine-tuned``) as columns."""
    names = list(results)
    metrics = sorted({m for r in results.values() for m in r})
    lines = [f"{'metric':<16}" + "".join(f"{n:>14}" for n in names)]
    lines += [f"{m:<16}" + "".join(f"{results[n].get(m, float('nan')):>14.4f}" for n in names) for m in metrics]
    return "\n".join(lines)


@dataclass
class Evaluation:
    """What ``score_checkpoint`` wrote: the output dir and the summary (metrics per model)."""

    out: Path
    summary: Dict[str, Any]
    results: Dict[str, Metrics] = field(default_factory=dict)


def _score_base(loaded: Any, score: Callable[[Any, Any], Tuple[Metrics, Rows]]) -> Tuple[Metrics, Rows]:
    """The untrained base model's scores: the adapter switched off, or the run's base model loaded."""
    from vlm_sweep.errors import CheckpointError
    from vlm_sweep.inference.load import load_for_inference

    if hasattr(loaded.model, "disable_adapter"):
        with loaded.model.disable_adapter():
            return score(loaded.model, loaded.processor)
    if not loaded.run_config:
        raise CheckpointError("--compare-base needs a checkpoint trained by vlm_sweep")
    base = load_for_inference(loaded.run_config["model"]["pretrained_model_name_or_path"])
    return score(base.model, base.processor)


def _write(out: Path, rows_by_model: Dict[str, Rows], summary: Dict[str, Any]) -> None:
    """``predictions.jsonl`` (one row per record and model) and ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as fh:
        for name, rows in rows_by_model.items():
            for row in rows:
                fh.write(json.dumps({"model": name, **row}, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def score_checkpoint(checkpoint: str, overrides: List[str], *, sampling: SamplingConfig, batch_size: int = 4,
                     max_samples: Optional[int] = None, compare_base: bool = False,
                     output_dir: Optional[str] = None, dtype: Optional[str] = None) -> Evaluation:
    """Score ``checkpoint`` on a data set split (default: the one it trained on) and write the results.

    Output goes to ``output_dir`` (default ``<step dir>/eval_<dataset>_<split>``).
    """
    from vlm_sweep.config.validate import validate_config
    from vlm_sweep.data.processor_kwargs import MediaKwargs
    from vlm_sweep.inference.load import find_model_dir, load_for_inference

    loaded = load_for_inference(checkpoint, dtype=dtype)
    cfg = compose_config(overrides, loaded.run_config)
    validate_config(cfg)
    samples = load_eval_samples(cfg.dataset, max_samples)

    def score(model: Any, processor: Any) -> Tuple[Metrics, Rows]:
        """Generate and score with the data set's pixel budget, as in training."""
        media = MediaKwargs(processor, cfg.dataset.min_pixels, cfg.dataset.max_pixels)
        return evaluate_samples(model, processor, samples, cfg.dataset.format, sampling, batch_size,
                                media_kwargs=media)

    results: Dict[str, Metrics] = {}
    rows_by_model: Dict[str, Rows] = {}
    if compare_base:
        results["base"], rows_by_model["base"] = _score_base(loaded, score)
    results["fine-tuned"], rows_by_model["fine-tuned"] = score(loaded.model, loaded.processor)

    model_dir, step_dir = find_model_dir(checkpoint)
    out = Path(output_dir) if output_dir else (step_dir or model_dir) / f"eval_{cfg.dataset.name}_{cfg.dataset.split}"
    summary = {"checkpoint": checkpoint, "dataset": cfg.dataset.name, "dataset_path": str(cfg.dataset.path),
               "split": cfg.dataset.split, "num_samples": len(samples), "metrics": results}
    _write(out, rows_by_model, summary)
    return Evaluation(out=out, summary=summary, results=results)
