"""What a data set IS, in one place: one module per data set, each defining ``SPEC``.

A ``DatasetSpec`` bundles everything keyed by a data set's name (``dataset.format``): how a
record becomes a conversation, which source rows are unusable by design, the task metric
and the names it reports, and a writer of a tiny offline copy in the source's own schema.

Adding a data set touches at most three files: ``sets/<name>.py`` (defining ``SPEC`` with
``name=<name>``), ``conf/dataset/<name>.yaml`` and optionally a test of what is special about
it (README: "Adding a model family, a data set or a PEFT method"). Modules are discovered with
``pkgutil``, so no table elsewhere needs the new name.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vlm_sweep.data.formats import Conversation
from vlm_sweep.errors import ConfigError

RecordFormat = Callable[[Dict[str, Any], Any], Conversation]
TaskMetric = Callable[[List[str], List[str]], Dict[str, float]]


@dataclass(frozen=True)
class RowFilter:
    """Rows a source holds that are unusable by design: dropped (and counted) at load time.

    ``keep`` sees an Arrow table of ``columns`` with media still encoded, so filtering
    decodes no image.
    """

    columns: Sequence[str]
    keep: Callable[[Any], List[bool]]
    reason: str


@dataclass(frozen=True)
class DatasetSpec:
    """One data set's schema knowledge; the generic loaders, metrics and CLIs look it up by name.

    ``to_conversation(record, dataset_cfg)`` raises ``ValueError``/``KeyError``/``TypeError`` on a
    bad record (the dataset names the record). ``metric(predictions, references)`` scores assistant
    texts and reports exactly ``metric_names`` (the config check refuses an objective naming any
    other). ``write_fixture(directory, seed=0, **sizes)`` writes a tiny seeded copy in the hub's
    schema and returns what to pass as ``dataset.path``; a config's ``dataset.synthetic`` holds
    its keyword arguments. ``launch_args`` are what a launch command on that copy needs besides
    ``dataset=<name> dataset.path=...`` (e.g. a video-capable model).
    """

    name: str
    to_conversation: RecordFormat
    metric: TaskMetric
    metric_names: Tuple[str, ...]
    write_fixture: Callable[..., Path]
    row_filter: Optional[RowFilter] = None
    launch_args: Tuple[str, ...] = ()


_SPECS: Dict[str, DatasetSpec] = {}


def all_specs() -> Dict[str, DatasetSpec]:
    """Every data set, by name: the ``SPEC`` of each module in this package (imported once)."""
    if not _SPECS:
        found: Dict[str, DatasetSpec] = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPEC", None)
            if not isinstance(spec, DatasetSpec) or spec.name != info.name:
                raise TypeError(f"{__name__}.{info.name} must define SPEC = DatasetSpec(name={info.name!r}, ...)")
            found[spec.name] = spec
        _SPECS.update(sorted(found.items()))
    return dict(_SPECS)


def get_spec(name: str, key: str = "dataset.format") -> DatasetSpec:
    """The data set called ``name``; an unknown one is a one-line ``ConfigError`` naming ``key``."""
    specs = all_specs()
    if name not in specs:
        raise ConfigError(f"config error: {key}={name!r} is not a known data set "
                          f"(known: {', '.join(specs)})")
    return specs[name]
