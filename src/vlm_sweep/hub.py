"""Is the Hugging Face hub usable? Answered in seconds, not after 25 s of retries."""

from __future__ import annotations

import os
import socket
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
