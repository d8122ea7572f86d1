"""Is the Hugging Face hub usable? Answered in seconds, not after 25 s of retries."""

from __future__ import annotations

import os
import socket
from typing import Optional
from urllib.parse import urlparse


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


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
