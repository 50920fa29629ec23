"""Credentials in storage URLs: shown and stored redacted, kept only where the run needs them.

A tracking URI or Optuna storage URL may carry a password (``postgresql://user:pw@host/db``).
Everything klstudy shows or stores as text — stdout, ``study.json``, ``spec.yaml``, MLflow params
and artifacts, the Ray job entrypoint — gets the redacted form (``postgresql://user:***@host/db``).
The real URLs live in ``<study_dir>/secrets.json`` (mode 0600), which the driver and the workers
read when they connect, or come from the environment (``KLSTUDY_TRACKING_URI``,
``KLSTUDY_OPTUNA_STORAGE``).

A URL's password is found the way the URL's consumer finds it:

- database URLs (an SQLAlchemy dialect, ``postgresql+psycopg://`` …: Optuna's RDB storage and
  MLflow's database stores hand them to SQLAlchemy) as SQLAlchemy's ``make_url`` does: the
  password runs from the first ``:`` after the user name to the first ``@``, so it may hold
  ``/``, ``?``, ``#`` or ``:`` unencoded;
- every other URL (``http(s)://`` MLflow servers: requests and urllib3) as RFC 3986 does: the
  authority ends at the first ``/``, ``?`` or ``#``, the user info at its last ``@``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote

SECRETS_FILE = "secrets.json"
REDACTED = "***"
TRACKING_ENV = "KLSTUDY_TRACKING_URI"
STORAGE_ENV = "KLSTUDY_OPTUNA_STORAGE"
# SQLAlchemy dialects (sqlalchemy.dialects plus common third-party ones); a "+driver" suffix
# always means SQLAlchemy.
_DB_SCHEMES = frozenset({"postgresql", "postgres", "mysql", "mariadb", "sqlite", "mssql",
                         "oracle", "cockroachdb", "redshift", "snowflake"})
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# SQLAlchemy's own grammar (sqlalchemy.engine.url._parse_url): user [^:/]*, password [^@]*
_DB_USERINFO = re.compile(r"(?P<user>[^:/]*):(?P<pw>[^@]*)@")
# RFC 3986: the authority ends at the first / ? #; the user info at its last @
_RFC_AUTHORITY = re.compile(r"[^/?#]*")
# a known password is replaced literally in text only from this length on (shorter ones would
# hit unrelated text; the URL patterns still catch them)
_MIN_LITERAL = 4


def _is_database(scheme: str) -> bool:
    return "+" in scheme or scheme.lower() in _DB_SCHEMES


def _password_span(url: str, *, stop_at_space: bool = False) -> tuple[int, int] | None:
    """(start, end) of the password in ``url`` (which starts with ``scheme://``), or None.

    ``stop_at_space``: ``url`` is the rest of a text, so the URL ends at the first whitespace.
    """
    m = _SCHEME.match(url)
    if m is None:
        return None
    head = m.end()
    rest = url[head:]
    if stop_at_space:
        rest = re.split(r"\s", rest, maxsplit=1)[0]
    if _is_database(m["scheme"]):
        info = _DB_USERINFO.match(rest)
        if info is None:
            return None
        return head + info.start("pw"), head + info.end("pw")
    authority = _RFC_AUTHORITY.match(rest).group()  # type: ignore[union-attr]
    userinfo, at, _ = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return None
    start = head + userinfo.index(":") + 1
    return start, head + len(userinfo)


def _checked_database_redaction(url: str, redacted: str) -> str:
    """``redacted`` when SQLAlchemy reads it as ``url`` with the password hidden; otherwise
    SQLAlchemy's own rendering with the password hidden (its parser is the authority)."""
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # a worker without SQLAlchemy: the grammar above is SQLAlchemy's
        return redacted
    try:
        parsed = make_url(url)
    except Exception:  # not an SQLAlchemy URL: nothing consumes it as one
        return redacted
    try:
        same = make_url(redacted) == parsed.set(password=REDACTED)
    except Exception:
        same = False
    if same or parsed.password is None:
        return redacted
    return parsed.render_as_string(hide_password=True)


def redact_url(url: str | None) -> str | None:
    """``url`` with its password replaced by ``***``; None and password-free URLs unchanged."""
    if not url or "://" not in url:
        return url
    span = _password_span(url)
    if span is None:
        return url
    redacted = url[: span[0]] + REDACTED + url[span[1]:]
    scheme = url.split("://", 1)[0]
    return _checked_database_redaction(url, redacted) if _is_database(scheme) else redacted


def password_of(url: str | None) -> str | None:
    """The password as the URL's consumer reads it (percent-decoded), or None."""
    if not url:
        return None
    span = _password_span(url)
    return None if span is None else unquote(url[span[0]: span[1]])


def redact_text(text: str, *, known: Iterable[str | None] = ()) -> str:
    """Every ``scheme://user:password@`` in ``text`` with the password replaced by ``***``.

    Args:
        text: any text (a log line, a YAML spec). In text a URL ends at the first whitespace,
            except in a one-line text that starts with the URL (a stored value).
        known: URLs whose passwords are also replaced wherever they appear literally (as written
            in the URL and percent-decoded), e.g. a quoted YAML value whose password holds a
            space, which the URL pattern cannot delimit.
    """
    if "\n" not in text and _SCHEME.match(text):  # a value that is one URL (an MLflow param)
        text = redact_url(text) or text
    out, pos = [], 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue
        span = _password_span(text[m.start():], stop_at_space=True)
        if span is None:
            continue
        start, end = m.start() + span[0], m.start() + span[1]
        out += [text[pos:start], REDACTED]
        pos = end
    text = "".join(out) + text[pos:]
    for url in known:
        for secret in _literal_passwords(url):
            text = text.replace(secret, REDACTED)
    return text


def _literal_passwords(url: str | None) -> list[str]:
    span = _password_span(url) if url else None
    if span is None or url is None:
        return []
    raw = url[span[0]: span[1]]
    forms = {raw, unquote(raw)}
    return sorted((f for f in forms if len(f) >= _MIN_LITERAL and f != REDACTED), key=len,
                  reverse=True)


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
    env_name = TRACKING_ENV if key == "tracking_uri" else STORAGE_ENV
    env = os.environ.get(env_name)
    if env and redact_url(env) == url:
        return env
    if study_dir is not None:
        path = Path(study_dir) / SECRETS_FILE
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if value and redact_url(value) == url:
                return value
    raise PermissionError(
        f"{key}: {url} is redacted and its credentials are neither in ${env_name} "
        f"nor in {Path(study_dir or '.') / SECRETS_FILE}"
    )
