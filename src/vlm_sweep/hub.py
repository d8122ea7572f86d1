"""Is the Hugging Face hub usable? Answered in seconds, not after 25 s of retries."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` (or a bare ``name``): what the hub could have; ``/data/cord``, ``./x``, ``a/b/c``,
    ``data/train.jsonl`` are paths."""
    return HUB_REPO_ID.fullmatch(source) is not None and not source.lower().endswith(DATA_FILE_SUFFIXES)


def names_a_local_path(source: str) -> bool:
    """Whether ``source`` can only mean a local path (so, when missing, it is a mistyped path, not a hub id).

    Not hub-shaped (``/abs``, ``./x``, ``~/x``, ``a/b/c``, ``data/train.jsonl``), or ``dir/name``
    whose ``dir`` exists here (``outputs/nope``); ``org/name`` with no ``org/`` here, or a bare
    ``name``, may be a hub id.
    """
    if not looks_like_hub_id(source):
        return True
    return "/" in source and Path(source).parent.is_dir()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to HF_ENDPOINT; transformers/datasets would retry for ~25 s instead."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def download_hint(repo_id: str, repo_type: str = "model", revision: Optional[str] = None) -> str:
    """The next step when a hub repo is needed but cannot be fetched here (one sentence, no newline).

    Names the ``hf`` CLI (what huggingface_hub installs; ``huggingface-cli`` is gone) and the
    config key that takes the downloaded directory. Gating is mentioned conditionally: only the
    hub knows whether a repo is gated.
    """
    key = "dataset.path" if repo_type == "dataset" else "model.pretrained_model_name_or_path"
    kind = "data set" if repo_type == "dataset" else "model"
    flags = (" --repo-type dataset" if repo_type == "dataset" else "") + (f" --revision {revision}" if revision else "")
    return (f"on a machine with network run `hf download{flags} {repo_id} --local-dir DIR` (if the {kind} "
            f"is gated, first accept its licence on huggingface.co and set HF_TOKEN), copy DIR here and set "
            f"{key}=DIR")
