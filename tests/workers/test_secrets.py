"""workers._secrets: passwords found as the URL's consumer finds them, and never shown."""

from __future__ import annotations

import json
import stat
import string
from urllib.parse import quote, urlsplit

import pytest
from sqlalchemy.engine import URL, make_url

from workers._secrets import (
    REDACTED,
    has_secret,
    password_of,
    redact_text,
    redact_url,
    reveal,
    write_secrets,
)

# every printable character a password may hold that is not a letter or digit
SPECIALS = sorted(set(string.punctuation) | {" "})
# what SQLAlchemy takes unencoded in a password: anything but '@' and a '%' that starts an
# escape (make_url percent-decodes the password)
RAW_OK = [c for c in SPECIALS if c not in "@% "]
DB_SCHEMES = ["postgresql", "postgresql+psycopg", "mysql+pymysql"]


def db_url(scheme: str, password: str, *, raw: bool) -> str:
    if raw:
        return f"{scheme}://user:{password}@db.example:5432/optuna?sslmode=require"
    return URL.create(scheme, username="user", password=password, host="db.example", port=5432,
                      database="optuna", query={"sslmode": "require"}
                      ).render_as_string(hide_password=False)


def assert_hidden(url: str, redacted: str, password: str) -> None:
    raw = url.split("user:", 1)[1].rsplit("@db.example", 1)[0]  # the password as written
    assert raw not in redacted and password not in redacted, redacted
    assert REDACTED in redacted
    assert has_secret(url)


def test_the_issues_example_is_redacted() -> None:
    url = "postgresql://user:pa/ss@db:5432/optuna"
    assert make_url(url).password == "pa/ss"  # what SQLAlchemy connects with
    assert redact_url(url) == "postgresql://user:***@db:5432/optuna"
    assert has_secret(url)


@pytest.mark.parametrize("scheme", DB_SCHEMES)
@pytest.mark.parametrize("char", RAW_OK)
def test_database_passwords_written_raw_are_redacted(scheme: str, char: str) -> None:
    password = f"pa{char}ss{char}w"
    url = db_url(scheme, password, raw=True)
    assert make_url(url).password == password  # SQLAlchemy reads it so (and would connect)
    redacted = redact_url(url)
    assert_hidden(url, redacted, password)
    assert make_url(redacted) == make_url(url).set(password=REDACTED)  # only the password
    assert password_of(url) == password


@pytest.mark.parametrize("scheme", DB_SCHEMES)
@pytest.mark.parametrize("char", SPECIALS)
def test_database_passwords_percent_encoded_are_redacted(scheme: str, char: str) -> None:
    password = f"pa{char}ss"
    url = db_url(scheme, password, raw=False)
    assert make_url(url).password == password
    redacted = redact_url(url)
    assert_hidden(url, redacted, password)
    assert make_url(redacted) == make_url(url).set(password=REDACTED)
    assert password_of(url) == password


@pytest.mark.parametrize("char", SPECIALS)
def test_http_passwords_are_redacted_as_requests_reads_them(char: str) -> None:
    password = f"pa{char}ss"
    url = f"http://user:{quote(password, safe='')}@mlflow.example:5000/base"
    parts = urlsplit(url)  # requests/urllib3 split the authority the same way
    assert parts.password is not None and parts.hostname == "mlflow.example"
    redacted = redact_url(url)
    assert redacted == "http://user:***@mlflow.example:5000/base"
    assert password_of(url) == password
    assert has_secret(url)


@pytest.mark.parametrize("url", [
    "http://mlflow.example:5000/path?email=a@b.example",  # '@' after the authority
    "http://user@mlflow.example:5000",  # a user, no password
    "postgresql://user@db:5432/optuna",
    "postgresql://db:5432/optuna",
    "sqlite:////tmp/x/optuna.db",
    "file:///tmp/mlruns",
])
def test_urls_without_a_password_are_unchanged(url: str) -> None:
    assert redact_url(url) == url
    assert not has_secret(url)
    assert redact_text(f"uri {url} here") == f"uri {url} here"


@pytest.mark.parametrize("char", RAW_OK)
def test_redact_text_hides_passwords_with_special_characters(char: str) -> None:
    password = f"pa{char}ss"
    url = db_url("postgresql", password, raw=True)
    for text in (f"storage: {url}\n", f"error: could not reach '{url}' (timeout)",
                 json.dumps({"storage": url, "other": "a@b"})):
        shown = redact_text(text)
        assert password not in shown.replace(REDACTED, ""), shown
        assert "user:***@db.example:5432/optuna" in shown, shown


def test_redact_text_hides_known_passwords_wherever_they_appear() -> None:
    url = "postgresql://user:two words@db:5432/optuna"  # SQLAlchemy reads "two words"
    assert make_url(url).password == "two words"
    text = f'pruning:\n  storage: "{url}"\n'
    assert "two words" not in redact_text(text, known=[url])
    assert "db:5432/optuna" in redact_text(text, known=[url])


def test_secrets_are_written_and_revealed(tmp_path) -> None:
    url = "postgresql://user:p/a?s#s@db:5432/optuna"
    write_secrets(tmp_path, {"pruning_storage": url, "tracking_uri": "http://mlflow:5000"})
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"pruning_storage": url}
    assert reveal(redact_url(url), study_dir=tmp_path, key="pruning_storage") == url


def test_reveal_without_the_secret_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(PermissionError, match="KLSTUDY_OPTUNA_STORAGE"):
        reveal("postgresql://user:***@db/optuna", study_dir=tmp_path, key="pruning_storage")


def test_a_one_line_value_that_is_a_url_is_redacted_as_a_url() -> None:
    """An MLflow param or a JSON value holds the URL alone: its password may hold a space."""
    url = "postgresql://user:two words@db:5432/optuna"
    assert redact_text(url) == "postgresql://user:***@db:5432/optuna"
