"""vlm_sweep entry point: compose a run from config groups and fine-tune.

    python launch.py                                  # tiny Gemma 3 + LoRA demo on CPU
    python launch.py model=gemma3 peft=lora           # google/gemma-3-4b-it on your GPU
    python launch.py -m optimizer.lr=1e-5,2e-5 peft=lora,none
    python launch.py --cfg job                        # print the composed config (fast)

Kept thin (and free of torch imports at module level) so `--cfg job` is fast.
"""

import hydra
from omegaconf import DictConfig

from vlm_sweep.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vlm_sweep.cli.train import run_job

    return run_job(cfg)


if __name__ == "__main__":
    import sys

    from vlm_sweep.config.validate import command_line_overrides, override_problem
    from vlm_sweep.console import quiet_chatty_loggers

    quiet_chatty_loggers()  # e.g. MLflow's "Creating initial database tables" when a sweep opens its store

    from pathlib import Path

    # Not an override at all (a stray path), or a wrong key, type or group option: one line, before Hydra
    # composes or writes anything.
    problem = override_problem(command_line_overrides(sys.argv[1:]), conf_dir=Path(__file__).resolve().parent / "conf")
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    main()
