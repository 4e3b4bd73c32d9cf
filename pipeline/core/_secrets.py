"""Keep passwords out of output, logs, MLflow tags and stored study files.

A storage or tracking URL may carry a password (`postgresql+psycopg://user:pw@host/db`,
`http://user:pw@host:5000`) or a secret query parameter (`?password=...`). Everything the project
prints or records shows such URLs through `mask_url`, and free text that may quote them (error
messages from drivers, YAML dumps of the resolved study file) through `mask_text`. A masked secret
reads `***`, the same mark SQLAlchemy's `URL.render_as_string(hide_password=True)` uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry a secret in database and HTTP URLs (libpq `password`, MySQL `passwd`,
# token-style auth); compared case-insensitively.
SECRET_PARAMS = frozenset({"password", "passwd", "pwd", "secret", "token", "access_token", "api_key", "apikey"})
# `scheme://user:password@` inside free text: the password is everything between the first `:` after
# `//` and the `@` that ends the userinfo (no whitespace, `/` or `@` inside, as RFC 3986 requires).
_USERINFO_IN_TEXT = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:)(?P<pw>[^\s/@]+)(?=@)")


def _split(url: str) -> SplitResult | None:
    try:
        return urlsplit(url)
    except ValueError:  # e.g. an unbalanced IPv6 bracket: not a URL we can take apart
        return None


def url_secrets(url: str) -> list[str]:
    """The secrets written in `url`: its password (as written and percent-decoded) and the values of
    secret query parameters (`SECRET_PARAMS`). Empty when there are none or `url` is no URL.

    Longest first, so replacing them one after another never leaves a tail of a longer secret.
    """
    parts = _split(url)
    if parts is None:
        return []
    found: set[str] = set()
    userinfo, at, _ = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        raw = userinfo.partition(":")[2]
        found.update(s for s in (raw, unquote(raw)) if s)
    for key, value in parse_qsl(parts.query, keep_blank_values=False):
        if key.lower() in SECRET_PARAMS:
            found.add(value)
    return sorted(found, key=len, reverse=True)


def mask_url(url: str) -> str:
    """`url` with its password and secret query values replaced by `***`; every other character as
    written (user name, host, port, path, other parameters, no re-encoding).

    `postgresql+psycopg://sweep:s3cret@db:5432/optuna` -> `postgresql+psycopg://sweep:***@db:5432/optuna`;
    `sqlite:///mlruns/optuna.db` and `grpc://proxy:13000` have no secret and come back unchanged.
    """
    parts = _split(url)
    if parts is None:
        return url
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = parts.query
    if query:
        fields = []
        for field in query.split("&"):
            key, eq, value = field.partition("=")
            secret = eq and value and unquote(key).lower() in SECRET_PARAMS
            fields.append(f"{key}={MASK}" if secret else field)
        query = "&".join(fields)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mask_text(text: str, urls: Iterable[str | None] = ()) -> str:
    """`text` with every secret of the given URLs replaced by `***`, wherever it appears (inside a
    quoted URL, alone in a driver's error message, in a YAML dump), and with the password of any other
    `scheme://user:password@` URL in the text masked too.

    `urls` may hold None (an unset option); URLs without a secret change nothing. A very short password
    is masked everywhere it occurs, even inside unrelated words: leaking it is the worse outcome.
    """
    for url in urls:
        if not url:
            continue
        masked = mask_url(url)
        if masked != url:
            text = text.replace(url, masked)
        for secret in url_secrets(url):
            text = text.replace(secret, MASK)
    return _USERINFO_IN_TEXT.sub(lambda m: m["head"] + MASK, text)


# A URL inside a command-line value (`--storage=URL`, `study.storage=URL`): from its scheme to the next blank.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")


def urls_in(values: Iterable[object]) -> list[str]:
    """Every URL written inside `values`: strings, lists of strings (repeated options), anything else
    skipped. `["run", "--storage=postgresql://u:pw@h/db", ["study.storage=mysql://u:x@h/db"]]` ->
    `["postgresql://u:pw@h/db", "mysql://u:x@h/db"]`; pass them to `mask_text` as the known URLs."""
    found: list[str] = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                found += _URL_IN_TEXT.findall(item)
    return found


def mask_mapping(values: dict[str, object], urls: Iterable[str | None] = ()) -> dict[str, object]:
    """A copy of a flat mapping (MLflow params or tags) whose string values went through `mask_text`
    with `urls`; other values unchanged."""
    known = list(urls)
    return {k: mask_text(v, known) if isinstance(v, str) else v for k, v in values.items()}
