"""API tokens and per-token rate limits.

Tokens come from ``MEDVL_API_TOKENS`` (comma-separated; ASCII, at least ``MIN_TOKEN_CHARS``) or a token file
holding one SHA-256 hex digest per line (``printf %s "$TOKEN" | sha256sum``; blank lines and ``#`` comments
ignored). Only digests are kept in memory; a request's ``Authorization: Bearer <token>`` (its bytes) is hashed and
compared
with every digest by ``hmac.compare_digest`` (constant time). A client is named in logs by the first
8 hex digits of its token's digest, never by the token.

Each token has a token bucket: ``burst`` requests at once, refilled at ``rate`` per second; a
request finding the bucket empty is answered 429 with ``Retry-After``. Requests without a valid
token are counted the same way per client address (``failure_burst`` at once, ``failure_rate`` per
second): past that, an address guessing tokens gets 429 instead of 401 until its bucket refills,
while requests with a valid token from the same address are not affected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import split_names
from ..errors import DataError, InputError

TOKENS_ENV = "MEDVL_API_TOKENS"
_DIGEST = re.compile(r"[0-9a-f]{64}")
MIN_TOKEN_CHARS = 16  # shorter tokens are guessable; refused at start
RANDOM_TOKENS = "use long random tokens (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token: what a token file holds."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def digests_from_env(value: str | None) -> list[str]:
    """Digests of the comma-separated tokens in ``MEDVL_API_TOKENS`` (none if unset)."""
    tokens = split_names(value or "")
    short = [n for n, token in enumerate(tokens, 1) if len(token) < MIN_TOKEN_CHARS]
    if short:
        raise InputError(f"{TOKENS_ENV}: token {short[0]} has fewer than {MIN_TOKEN_CHARS} characters; {RANDOM_TOKENS}")
    # a header carries bytes, which clients encode their own way (curl UTF-8, a browser Latin-1 or not at all): a
    # non-ASCII token would match one kind of client only
    foreign = [n for n, token in enumerate(tokens, 1) if not token.isascii()]
    if foreign:
        raise InputError(f"{TOKENS_ENV}: token {foreign[0]} holds a character that is not ASCII, which HTTP clients "
                         f"do not send alike; {RANDOM_TOKENS}")
    return [token_digest(token) for token in tokens]


def digests_from_file(path: str | Path) -> list[str]:
    """The SHA-256 hex digests in a token file, one per line; anything else is a DataError."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DataError(path, f"cannot read the token file ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise DataError(path, "token file is not UTF-8 text") from None
    digests = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if not _DIGEST.fullmatch(entry):
            raise DataError(path, f"line {number}: expected a SHA-256 hex digest (64 hex digits), "
                                  "not a token; store `printf %s TOKEN | sha256sum`")
        digests.append(entry)
    return digests


def load_digests(token_file: str | Path | None = None) -> list[str]:
    """The digests of the tokens the service accepts: the token file's and ``MEDVL_API_TOKENS``'s."""
    digests = digests_from_env(os.environ.get(TOKENS_ENV))
    if token_file is not None:
        digests += digests_from_file(token_file)
    return sorted(set(digests))


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class TokenAuth:
    """Checks bearer tokens against stored digests and applies each token's rate limit."""

    digests: list[str]
    rate: float = 10.0  # requests per second per token (0: no limit)
    burst: int = 20
    failure_rate: float = 1.0  # requests without a valid token per second per client address
    failure_burst: int = 20
    _buckets: dict[str, _Bucket] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self, authorization: str | None) -> str | None:
        """The matching digest for an ``Authorization`` header value (as Starlette gives it: its bytes read as
        Latin-1), else None. The token's bytes as sent are hashed: a token file's digest of a UTF-8 token
        (``printf %s TOKEN | sha256sum``) matches a client sending it in UTF-8."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip(" \t")  # HTTP's white space only: str.strip would take bytes 0x85, 0xA0 of a UTF-8 token
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            offered = hashlib.sha256(token.encode("latin-1")).hexdigest()
        except UnicodeEncodeError:  # not read from a header's bytes
            return None
        found = None
        for digest in self.digests:  # every digest compared, in constant time each
            if hmac.compare_digest(offered, digest):
                found = digest
        return found

    def retry_after(self, digest: str, now: float | None = None) -> float:
        """0 if ``digest`` may make a request now (and count it), else seconds until it may."""
        if self.rate <= 0:
            return 0.0
        return self._take(digest, self.rate, self.burst, now)

    def failure_retry_after(self, address: str, now: float | None = None) -> float:
        """Count a request without a valid token from ``address``: 0 while the address is within
        its allowance (answer 401), else seconds until it is again (answer 429)."""
        return self._take(f"failed:{address}", self.failure_rate, self.failure_burst, now)

    def _take(self, key: str, rate: float, burst: int, now: float | None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
                self._forget_idle(now)
            bucket = self._buckets.setdefault(key, _Bucket(float(burst), now))
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def _forget_idle(self, now: float) -> None:
        """Make room among the counters (at most ``MAX_BUCKETS``, one per token and per client address that sent
        no valid token): first those refilled to their burst, which a fresh counter equals; then the least
        recently used half."""
        for key, bucket in list(self._buckets.items()):
            rate, burst = ((self.failure_rate, self.failure_burst) if key.startswith("failed:")
                           else (self.rate, self.burst))
            if bucket.tokens + (now - bucket.updated) * rate >= burst:
                del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:
            for key, _ in sorted(self._buckets.items(), key=lambda item: item[1].updated)[:MAX_BUCKETS // 2]:
                del self._buckets[key]


MAX_BUCKETS = 10_000  # rate-limit counters kept at once (tokens, and client addresses without a valid token)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
