"""Secrets never reach a saved config, an MLflow param/tag, a log line or a printed URI.

Two kinds of masking: values under secret-looking keys or equal to a secret environment
variable (``REDACTED``), and the user-info of any ``scheme://user:pass@host`` URI (``***``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

# A key is secret if one of its _/./- separated parts is one of these (max_new_tokens is not).
SECRET_KEY = re.compile(
    r"(^|[_.-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?|private[_-]?key|auth)"
    r"($|[_.-])", re.I)
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AZURE_STORAGE_ACCESS_KEY")
REDACTED = "***REDACTED***"
# scheme://<user-info>@host: user-info holds no unencoded / ? # or blank; the greedy match
# ends at the authority's last "@" (a password may contain "@").
_URI_USER_INFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")
CREDENTIALS_IN_URI_ERROR = (
    "config error: tracking.uri contains credentials; remove them and set "
    "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")


def uri_has_credentials(uri: str) -> bool:
    """True when ``uri`` (or any URI inside the string) carries user-info (user, password or token)."""
    return bool(_URI_USER_INFO.search(str(uri)))


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """``http://user:pw@host:5000`` -> ``http://***@host:5000``; every URI inside the string."""
    if uri is None:
        return None
    return _URI_USER_INFO.sub(r"\1***@", str(uri))


def _secret_values() -> List[str]:
    values = [os.environ.get(v, "") for v in SECRET_ENV_VARS]
    values += [v for k, v in os.environ.items() if SECRET_KEY.search(k)]
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    match = _URI_USER_INFO.search(env_uri)
    if match:  # the password of a credentialed $MLFLOW_TRACKING_URI, wherever it is quoted alone
        user_info = env_uri[match.end(1):match.end() - 1]
        values.append(user_info.partition(":")[2] or user_info)
    return [v for v in values if len(v) >= 6]


def redact(obj: Any, _secrets: Optional[List[str]] = None) -> Any:
    """Copy of a nested dict/list with secret-looking keys, secret values and URI credentials masked."""
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        obj = redact_uri(obj)
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj


def flatten(obj: Any, prefix: str = "") -> Dict[str, str]:
    """{"optimizer.lr": "0.0005", ...} from a nested dict."""
    out: Dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(obj)
    return out
