"""Check a whole data set against a model before training on it.

    python -m vlm_sweep.inspect                                   # the default run's data
    python -m vlm_sweep.inspect model=tiny_qwen2_5_vl dataset=custom dataset.path=my.jsonl
    python -m vlm_sweep.inspect --sample 500 dataset=llava_video_178k ...   # a seeded sample per split

Takes the same overrides as ``launch.py`` and composes the config the same way, then loads
only the processor (no weights), builds the data sets and collator the run would build, and
runs the data pre-flight (vlm_sweep.data.preflight) over every record. Prints the report and
exits 0 when the data is usable; exits 2 with one line naming the first problem otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional

from vlm_sweep.errors import UserError

CONFIG_NAME = "config"


class ConfDirError(UserError, RuntimeError):
    """The Hydra config directory could not be found."""


def find_conf_dir(start: Optional[Path] = None) -> Path:
    """This suite's ``conf/`` (the one next to launch.py): from ``start`` (the cwd) upwards, else
    next to the package. A ``conf/config.yaml`` of another Hydra project (no ``run_schema``) is passed over."""
    start = Path(start or Path.cwd()).resolve()
    from vlm_sweep.config.paths import conf_dir

    package_conf = conf_dir()  # the package's own conf/ (package data), wherever it is installed
    for conf in (*(base / "conf" for base in (start, *start.parents)), package_conf):
        config = conf / f"{CONFIG_NAME}.yaml"
        if config.is_file() and "run_schema" in config.read_text(errors="replace"):
            return config.parent
    raise ConfDirError(f"config error: no conf/{CONFIG_NAME}.yaml in {start}, its parents or {package_conf}; "
                       f"run from the vlm_sweep repository")


def compose_config(overrides: List[str], conf_dir: Path) -> Any:
    """The run config as ``launch.py`` composes it (without the hydra node)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vlm_sweep.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides))


def load_processor_only(model_cfg: Any) -> Any:
    """The model's processor, loaded as the run loads it, without the weights."""
    from vlm_sweep.models.load import ModelLoadError, load_processor, preflight_hub_access, resolve_source

    source = resolve_source(model_cfg)
    preflight_hub_access(source, model_cfg.revision)
    try:
        return load_processor(source, model_cfg)
    except OSError as err:
        raise ModelLoadError(f"could not load the processor of {source!r}: {str(err).splitlines()[0]}") from err


def inspect(cfg: Any, sample_size: Optional[int] = None, progress: bool = False) -> Any:
    """Validate ``cfg``, build what the run builds for its data, and run the pre-flight."""
    from vlm_sweep.config.validate import validate_config
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.data.preflight import run_preflight
    from vlm_sweep.models.registry import get_family

    validate_config(cfg)
    processor = load_processor_only(cfg.model)
    datasets = build_datasets(cfg.dataset)
    collator = VLMCollator.for_dataset(processor, cfg.dataset)
    return run_preflight(cfg, processor, get_family(cfg.model.family), datasets, collator, sample_size=sample_size,
                         progress=progress)


# Beyond the run's user errors: no conf dir, and Hydra's composition errors.
_MORE_USER_ERRORS = ("MissingConfigException", "ConfigCompositionException")


def _is_user_error(err: BaseException) -> bool:
    from vlm_sweep.errors import is_user_error

    return is_user_error(err) or type(err).__name__ in _MORE_USER_ERRORS


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlm_sweep.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for launch.py")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="check N records per split (the first half plus a seeded random half); default: all")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    if args.sample is not None and args.sample < 1:
        print(f"config error: --sample must be >= 1 (got {args.sample})", file=sys.stderr)
        return 2
    try:
        from vlm_sweep.config.validate import override_problem

        conf_dir = find_conf_dir()
        problem = override_problem(args.overrides, conf_dir=conf_dir)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        cfg = compose_config(args.overrides, conf_dir)
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        report = inspect(cfg, sample_size=args.sample, progress=sys.stderr.isatty())
    except Exception as err:
        if not _is_user_error(err):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(message if message.startswith("config error:") else f"error: {message}", file=sys.stderr)
        return 2
    from vlm_sweep.data.preflight_report import format_report

    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
