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
from vlm_sweep.rundir import EVAL_PREDICTIONS, EVAL_SUMMARY, default_eval_dir, find_model_dir

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
                         "reference": reference(sample.conversation)})
    if world_size > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r["record_id"])
    metrics = get_spec(record_format).metric([r["prediction"] for r in rows], [r["reference"] for r in rows])
    return metrics, rows


def reference(conversation: Any) -> Any:
    """What the metric compares a prediction with: the last answer's text, or the list of every
    accepted answer when the data set puts one in that turn's ``references`` (DocVQA's ANLS)."""
    last = [turn for turn in conversation if turn["role"] == "assistant"][-1]
    return last.get("references") or assistant_texts(conversation)[-1]


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
    rows: Dict[str, Rows] = field(default_factory=dict)  # per model: record_id, prediction, reference
    samples: List[Any] = field(default_factory=list)  # the scored records (their images, for examples)


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
    with open(out / EVAL_PREDICTIONS, "w") as fh:
        for name, rows in rows_by_model.items():
            for row in rows:
                fh.write(json.dumps({"model": name, **row}, ensure_ascii=False) + "\n")
    (out / EVAL_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def score_checkpoint(checkpoint: str, loaded: Any, cfg: Any, *, sampling: SamplingConfig, batch_size: int = 4,
                     max_samples: Optional[int] = None, compare_base: bool = False,
                     output_dir: Optional[str] = None) -> Evaluation:
    """Score the ``loaded`` checkpoint (``load_for_inference(checkpoint)``) on ``cfg.dataset``'s split
    (a composed, validated config: ``config.compose.compose_eval_config``) and write the results.

    Output goes to ``output_dir`` (default: ``rundir.default_eval_dir``, beside a run's checkpoints).
    """
    from vlm_sweep.data.processor_kwargs import MediaKwargs

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
    out = Path(output_dir) if output_dir else default_eval_dir(model_dir, step_dir, cfg.dataset.name,
                                                               cfg.dataset.split)
    summary = {"checkpoint": checkpoint, "dataset": cfg.dataset.name, "dataset_path": str(cfg.dataset.path),
               "split": cfg.dataset.split, "num_samples": len(samples), "metrics": results}
    _write(out, rows_by_model, summary)
    return Evaluation(out=out, summary=summary, results=results, rows=rows_by_model, samples=list(samples))
