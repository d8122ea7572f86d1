"""Where the suite's Hydra config tree (``conf/``) is, wherever the package is installed.

``conf/`` is package data of ``vlm_sweep`` (``src/vlm_sweep/conf`` links to the repository's
``conf/``; pyproject.toml's package-data copies it into a wheel), so commands that compose a
config themselves (``evaluate``) find it through ``importlib.resources``, from any working
directory, in an editable install and in a regular one alike.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vlm_sweep.errors import ConfigError

CONFIG_NAME = "config"


def conf_dir() -> Path:
    """The ``conf/`` directory shipped with the installed package (holds ``config.yaml``)."""
    conf = Path(str(resources.files("vlm_sweep") / "conf")).resolve()
    if not (conf / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"config error: the vlm_sweep package has no conf/{CONFIG_NAME}.yaml ({conf}); "
                          f"reinstall it (pip install -e . in a checkout)")
    return conf
