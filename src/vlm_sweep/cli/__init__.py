"""Command-line entry points: thin wrappers over ``vlm_sweep.inference`` and the training recipe.

    python -m vlm_sweep.cli.generate --checkpoint <dir|hub id> --image receipt.png
    python -m vlm_sweep.cli.evaluate --checkpoint <dir> dataset.split=test --compare-base
    python -m vlm_sweep.cli.export --checkpoint <dir> --output-dir exported/ --merge-lora
    (training: launch.py -> vlm_sweep.cli.train.run_job)

Flags and defaults are defined once, in ``vlm_sweep.cli.args``; every command turns a
``vlm_sweep.errors.UserError`` into one line and exit status 2 (``vlm_sweep.cli.user_errors``).
Nothing outside this package imports it, except launch.py and the old ``python -m`` shims.
"""
