"""Score a checkpoint on a data set split with the task's own metric.

    python -m vlm_sweep.cli.evaluate --checkpoint <run|step|model dir|hub id> \\
        [dataset=cord_v2 dataset.split=test ...] [--max-samples N] [--compare-base] [--examples N]

Hydra-style overrides select the data set (default: the one the checkpoint was trained
on, with its settings, e.g. a local ``dataset.path``; ``dataset.<key>=`` overrides one).
Writes ``predictions.jsonl`` (one row per record) and ``summary.json`` to ``--output-dir``
(default ``<run>/evaluations/step_<N>_eval_<dataset>_<split>`` for a run's checkpoint, kept when
``checkpoint.keep_last`` prunes the step; ``<model dir>/eval_<dataset>_<split>`` otherwise) and prints the metrics; ``--compare-base``
puts the untrained base model's metrics next to them; ``--examples N`` prints the first N
records' ground truth and answer one above the other and saves their images under ``examples/``. The config is composed from the
conf/ shipped with the installed package, so this runs from any directory.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from vlm_sweep.cli.args import EVALUATE, build_parser, sampling_config
from vlm_sweep.cli.user_errors import run_command


def _main(argv: Optional[List[str]]) -> int:
    """Parse flags (the rest are Hydra overrides), score, print where the results went and the table."""
    parser = build_parser("python -m vlm_sweep.cli.evaluate", __doc__, EVALUATE)
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from vlm_sweep.console import silence_known_noise

    silence_known_noise()
    from vlm_sweep.config.compose import compose_eval_config
    from vlm_sweep.config.validate import validate_config
    from vlm_sweep.inference.load import load_for_inference, resolve_checkpoint
    from vlm_sweep.inference.score import format_table, score_checkpoint

    # The checkpoint's whereabouts and config, then the overrides: every mistake stops before a model loads.
    _, _, run_config = resolve_checkpoint(args.checkpoint)
    cfg = compose_eval_config(overrides, run_config)
    validate_config(cfg)
    loaded = load_for_inference(args.checkpoint, dtype=args.dtype)
    evaluation = score_checkpoint(args.checkpoint, loaded, cfg, sampling=sampling_config(args),
                                  batch_size=args.batch_size, max_samples=args.max_samples,
                                  compare_base=args.compare_base, output_dir=args.output_dir)
    summary = evaluation.summary
    print(f"{summary['dataset']}/{summary['split']}: {summary['num_samples']} records, "
          f"predictions in {evaluation.out}")
    print(format_table(evaluation.results))
    if args.examples > 0:
        from vlm_sweep.inference.examples import show_examples
        from vlm_sweep.rundir import EVAL_EXAMPLES, EVAL_PREDICTIONS

        print()
        print(show_examples(evaluation.rows["fine-tuned"], evaluation.samples, evaluation.out / EVAL_EXAMPLES,
                            num=args.examples, predictions_path=evaluation.out / EVAL_PREDICTIONS))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: a user error (bad override, missing checkpoint or data) is one line, exit 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
