"""Score a checkpoint on a data set split with the task's own metric.

    python -m vlm_sweep.evaluate --checkpoint-path <run|step|model dir|hub id> \\
        [dataset=cord_v2 dataset.split=test ...] [--max-samples N] [--compare-base]

Hydra-style overrides select the data set (default: the one the checkpoint was trained
on, with its settings, e.g. a local ``dataset.path``; ``dataset.<key>=`` overrides one). Writes ``predictions.jsonl`` (one row per record) and ``summary.json`` to
``--output-dir`` (default ``<checkpoint>/eval_<dataset>_<split>``) and prints the metrics;
``--compare-base`` puts the untrained base model's metrics next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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

    from vlm_sweep.config.schema import register_configs

    composed = list(overrides)
    if run_config and not any(o.startswith("dataset=") for o in overrides):
        name = run_config["dataset"]["name"]
        if (CONF_DIR / "dataset" / f"{name}.yaml").exists():
            composed = [f"dataset={name}", *overrides]
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=composed)
    return with_run_dataset(cfg, overrides, run_config)


def load_eval_samples(dataset_cfg: Any, max_samples: Optional[int]) -> List[Any]:
    from vlm_sweep.data.datasets import ConversationDataset, load_split

    split = load_split(dataset_cfg, dataset_cfg.split)
    if max_samples is not None:
        split = split.select(range(min(max_samples, len(split))))
    dataset = ConversationDataset(split, dataset_cfg, dataset_cfg.split)
    return [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    names = list(results)
    metrics = sorted({m for r in results.values() for m in r})
    lines = [f"{'metric':<16}" + "".join(f"{n:>14}" for n in names)]
    lines += [f"{m:<16}" + "".join(f"{results[n].get(m, float('nan')):>14.4f}" for n in names) for m in metrics]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_sweep.evaluate", description="Evaluate a checkpoint.")
    p.add_argument("--checkpoint-path", required=True)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--compare-base", action="store_true", help="also score the untrained base model")
    args, overrides = p.parse_known_args(argv)
    from vlm_sweep.console import silence_known_noise

    silence_known_noise()

    from vlm_sweep.cli import USER_ERRORS
    from vlm_sweep.config.validate import validate_config
    from vlm_sweep.generation import SamplingConfig
    from vlm_sweep.inference import find_model_dir, load_for_inference

    try:
        loaded = load_for_inference(args.checkpoint_path)
        cfg = compose_config(overrides, loaded.run_config)
        validate_config(cfg)
        samples = load_eval_samples(cfg.dataset, args.max_samples)
    except Exception as err:
        if type(err).__name__ in USER_ERRORS:
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    from vlm_sweep.evaluation import evaluate_samples

    from vlm_sweep.data.processor_kwargs import MediaKwargs

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    def score(model: Any, processor: Any) -> Any:
        """Generate and score with the data set's pixel budget, as in training."""
        media = MediaKwargs(processor, cfg.dataset.min_pixels, cfg.dataset.max_pixels)
        return evaluate_samples(model, processor, samples, cfg.dataset.format, sampling, args.batch_size,
                                media_kwargs=media)

    results: Dict[str, Dict[str, float]] = {}
    rows_by_model: Dict[str, List[dict]] = {}
    if args.compare_base:
        if hasattr(loaded.model, "disable_adapter"):
            with loaded.model.disable_adapter():
                base = score(loaded.model, loaded.processor)
        else:
            source = loaded.run_config["model"] if loaded.run_config else None
            if source is None:
                print("error: --compare-base needs a checkpoint trained by vlm_sweep", file=sys.stderr)
                return 2
            base_loaded = load_for_inference(source["pretrained_model_name_or_path"])
            base = score(base_loaded.model, base_loaded.processor)
        results["base"], rows_by_model["base"] = base
    results["fine-tuned"], rows_by_model["fine-tuned"] = score(loaded.model, loaded.processor)

    model_dir, step_dir = find_model_dir(args.checkpoint_path)
    default_out = (step_dir or model_dir) / f"eval_{cfg.dataset.name}_{cfg.dataset.split}"
    out = Path(args.output_dir) if args.output_dir else default_out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as fh:
        for name, rows in rows_by_model.items():
            for row in rows:
                fh.write(json.dumps({"model": name, **row}, ensure_ascii=False) + "\n")
    summary = {"checkpoint": args.checkpoint_path, "dataset": cfg.dataset.name, "dataset_path": str(cfg.dataset.path),
               "split": cfg.dataset.split, "num_samples": len(samples), "metrics": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{cfg.dataset.name}/{cfg.dataset.split}: {len(samples)} records, predictions in {out}")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
