"""PostgreSQL index addresses: ``postgresql://user:password@host:port/db?param=value#table``.

One parser (``parse_pg_url``) decides where the password, the query and the table are; every message, log
line, output and HTTP answer shows an address through ``redact`` (or ``PgUrl.shown``), which uses that same
parser, so the two can never disagree about where a password ends.

A URL is taken apart as RFC 3986 says (``urllib.parse.urlsplit``): the table is the part after the first
``#``, the query the part between the first ``?`` and it. A character that ends a part (``@ / ? # &`` and
``%``) inside a password has to be percent-encoded (``%40 %2F %3F %23 %26 %25``); a URL where one was not (the
part after ``#`` is not a table name, two ``@``, a port that is not a number, a query entry that is not a known
libpq ``name=value``, a ``%`` not followed by two hex digits) is refused with a message that quotes none of it.
A URL that cannot be parsed is shown as ``postgresql://***``. A table named right after a hidden query value
(``...&password=xyz#name``) is shown as ``#***``: it may be the end of a password holding an unencoded ``#``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import InputError

SCHEMES = ("postgresql", "postgres")
DEFAULT_TABLE = "medvl_cases"
TABLE_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,50}\Z")
HIDDEN = "***"

# libpq URL parameters whose values are shown in messages and outputs; every other parameter's value
# (password, sslpassword, passfile, sslkey, options, ...) is replaced by ``***``
SHOWN_URL_PARAMETERS = frozenset({
    "host", "hostaddr", "port", "dbname", "user", "connect_timeout", "sslmode", "gssencmode", "application_name",
    "fallback_application_name", "target_session_attrs", "load_balance_hosts", "client_encoding", "keepalives",
    "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout", "channel_binding",
})
# every parameter libpq takes in a URL (PostgreSQL 17's list, plus ``ssl`` which it maps to sslmode)
LIBPQ_URL_PARAMETERS = SHOWN_URL_PARAMETERS | frozenset({
    "password", "passfile", "require_auth", "options", "replication", "requiressl", "sslcompression", "sslcert",
    "sslkey", "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "krbsrvname", "gsslib", "gssdelegation", "service",
    "sslnegotiation", "ssl",
})
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOST = re.compile(r"(\[[^\[\]@/?#]*\]|[^\[\]:@/?#]*)(:[0-9]*)?\Z")  # one host of a comma-separated list
ENCODE_HINT = "percent-encode @ / ? # & % in a password as %40 %2F %3F %23 %26 %25"


@dataclass(frozen=True)
class PgUrl:
    """A parsed index URL: ``conninfo`` (what libpq connects with: the URL without ``#table``), ``table``,
    ``shown`` (the URL without its secrets, for people) and ``secrets`` (the password and every hidden query
    value, raw and decoded: scrubbed from libpq's own messages)."""

    conninfo: str
    table: str
    shown: str
    shown_table: str
    secrets: tuple[str, ...]

    def scrub(self, text: str) -> str:
        """``text`` (a libpq message) with every secret of this URL replaced by ``***``."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, HIDDEN)
        return text


def _refuse(problem: str) -> InputError:
    return InputError(f"the index URL {problem}; {ENCODE_HINT} (the table comes after the '#')")


def parse_pg_url(url: str) -> PgUrl:
    """The parts of a PostgreSQL index URL; InputError, quoting nothing of the URL, when it is malformed."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise InputError("an index URL starts with postgresql:// or postgres://")
    if _BAD_PERCENT.search(url):
        raise _refuse("has a '%' that is not followed by two hex digits")
    try:
        parts = urlsplit(url)
    except ValueError:  # a '[' in a password: read as an IPv6 host
        raise _refuse("has a host that cannot be read") from None
    table = parts.fragment or DEFAULT_TABLE
    if parts.fragment and not TABLE_PATTERN.match(parts.fragment):
        raise _refuse("has a '#' that is not followed by a table name (lower-case letters, digits and _, "
                      "up to 51)")
    if parts.netloc.count("@") > 1 or "@" in parts.path:
        raise _refuse("cannot be split into user, password and host (an '@' too many, or one after a '/')")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not all(_HOST.match(host) for host in hosts.split(",")):
        raise _refuse("has a host or port that cannot be read (a port is a number)")
    if parts.path.count("/") > 1:
        raise _refuse("has a '/' in its database name")
    secrets: list[str] = []
    user, colon, password = userinfo.partition(":")
    if colon and password:
        secrets += [password, unquote(password)]
    shown_query, hides_last = [], False
    for entry in parts.query.split("&") if parts.query else []:
        name, equals, value = entry.partition("=")
        if not equals or unquote(name) not in LIBPQ_URL_PARAMETERS:
            raise _refuse("has a query entry that is not a libpq name=value")
        hides_last = unquote(name) not in SHOWN_URL_PARAMETERS
        if hides_last and value:
            secrets += [value, unquote(value)]
        shown_query.append(f"{name}={HIDDEN}" if hides_last else entry)
    address = f"{user}{':' + HIDDEN if colon else ''}{at}{hosts}" if at else hosts
    shown = f"{parts.scheme}://{address}{parts.path}" + (f"?{'&'.join(shown_query)}" if parts.query else "")
    shown_table = HIDDEN if parts.fragment and hides_last else table  # may be a password's end
    if parts.fragment:
        shown += f"#{shown_table}"
    conninfo = url.partition("#")[0]
    return PgUrl(conninfo, table, shown, shown_table, tuple(s for s in secrets if s))


def redact(url: str) -> str:
    """A URL without its secrets, for messages and outputs: the password of ``user:password@`` and the value
    of every query parameter but the plain connection ones (``SHOWN_URL_PARAMETERS``) become ``***``; a URL that
    cannot be parsed shows as ``<scheme>://***``."""
    try:
        return parse_pg_url(url).shown
    except InputError:
        scheme = url.partition("://")[0]
        return f"{scheme if scheme.lower() in SCHEMES else 'postgresql'}://{HIDDEN}"
