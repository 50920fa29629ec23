"""Credentials in storage URLs: shown and stored redacted, kept only where the run needs them.

A tracking URI or Optuna storage URL may carry a password (``postgresql://user:pw@host/db``).
Everything klstudy shows or stores as text — stdout, ``study.json``, ``spec.yaml``, MLflow params
and artifacts, the Ray job entrypoint — gets the redacted form (``postgresql://user:***@host/db``).
The real URLs live in ``<study_dir>/secrets.json`` (mode 0600), which the driver and the workers
read when they connect, or come from the environment (``KLSTUDY_TRACKING_URI``,
``KLSTUDY_OPTUNA_STORAGE``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

SECRETS_FILE = "secrets.json"
REDACTED = "***"
TRACKING_ENV = "KLSTUDY_TRACKING_URI"
STORAGE_ENV = "KLSTUDY_OPTUNA_STORAGE"
# scheme://user:password@host — the password is everything up to the last '@' of the authority
_IN_TEXT = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<pw>[^\s/]*)(?P<at>@)")


def redact_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***``; None and password-free URLs unchanged."""
    if not url or "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password replaced by ``***``."""
    return _IN_TEXT.sub(lambda m: f"{m['head']}{REDACTED}{m['at']}", text)


def has_secret(url: str | None) -> bool:
    return bool(url) and redact_url(url) != url


def write_secrets(study_dir: Path, secrets: dict[str, str | None]) -> None:
    """Store the real URLs that carry credentials in a 0600 file (nothing when none do)."""
    kept = {k: v for k, v in secrets.items() if has_secret(v)}
    if not kept:
        return
    path = study_dir / SECRETS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(kept, f)
    os.chmod(path, 0o600)


def reveal(url: str | None, *, study_dir: Path | str | None, key: str) -> str | None:
    """The real URL for a redacted one: from the environment, then the study's secrets file."""
    if url is None or REDACTED not in url:
        return url
    env = os.environ.get(TRACKING_ENV if key == "tracking_uri" else STORAGE_ENV)
    if env and redact_url(env) == url:
        return env
    if study_dir is not None:
        path = Path(study_dir) / SECRETS_FILE
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value and redact_url(value) == url:
                return value
    raise PermissionError(
        f"{key}: {url} is redacted and its credentials are neither in ${TRACKING_ENV if key == 'tracking_uri' else STORAGE_ENV} "
        f"nor in {Path(study_dir or '.') / SECRETS_FILE}"
    )
