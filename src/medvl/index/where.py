"""A small, safe filter language for ``--where``, compiled to a parameterised SQL fragment.

Grammar (keywords case-insensitive)::

    expr       := term ("or" term)*
    term       := factor ("and" factor)*
    factor     := "not" factor | "(" expr ")" | comparison
    comparison := column op literal
                | column ["not"] "in" "(" literal ("," literal)* ")"
                | column "is" ["not"] "null"
    op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
    literal    := 'text' (a quote inside is doubled: 'O''Brien') | "text" | number
    number     := -?digits[.digits][(e|E)[+-]digits], ASCII digits; at most 2**53 - 1 in magnitude (1e300 and
                  1e400, infinity as a float, are refused: a numeric column holds no such number)

Columns are limited to the index's known filter columns, each numeric or text, and a literal must
have its column's type. Column names come from that list, never from the input; every literal is
a bound parameter. Anything else (``;``, ``--``, ``*``, functions, a number where a column must be)
is an ``InputError`` naming the position. Example: ``sex = 'F' and age >= 60``.

``parse_where`` turns the text into a small expression tree (``Compare``, ``Member``, ``IsNull``,
``Not``, ``Junction``); ``compile_where`` renders that tree as SQL (SQLite, PostgreSQL), and
``medvl.index.filter_columns`` evaluates the same tree on column arrays. A comparison or ``in`` on a
NULL value is unknown, as in SQL (``not`` of unknown is unknown; a row is selected only when the
whole filter is true).

A blank filter (``None``, empty, or only spaces) is no filter (``given_filter``): the same on the command line
(``--where ""``, ``--where "  "``) and in the service, which reads a blank form field as absent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .cases import INEXACT_INTEGER, NUMBER, number_problem

KEYWORDS = {"and", "or", "not", "in", "is", "null"}
OPERATORS = ("<=", ">=", "!=", "<>", "=", "<", ">")
ORDERING = ("<", "<=", ">", ">=")  # the comparisons that depend on a collation for text
MAX_LENGTH = 2000
MAX_DEPTH = 50
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)(?![A-Za-z_])
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*")
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str  # number | name | keyword | string | op | punct | end
    text: str
    pos: int  # 0-based character offset in the filter
    value: Any = None


@dataclass(frozen=True)
class Compare:
    """``column op value``; ``op`` is one of ``= != < <= > >=`` (``<>`` is read as ``!=``)."""

    column: str  # a filter column name (lower case)
    op: str
    value: str | float  # text for a text column, a float for a numeric one


@dataclass(frozen=True)
class Member:
    """``column [not] in (values)``."""

    column: str
    values: tuple[str | float, ...]
    negated: bool


@dataclass(frozen=True)
class IsNull:
    """``column is [not] null``: never unknown."""

    column: str
    negated: bool


@dataclass(frozen=True)
class Not:
    operand: Expression


@dataclass(frozen=True)
class Junction:
    """``a and b and ...`` (``op`` "and") or ``a or b or ...`` ("or"), two operands or more."""

    op: str
    operands: tuple[Expression, ...]


Expression = Compare | Member | IsNull | Not | Junction


@dataclass(frozen=True)
class Where:
    """A compiled filter: an SQL boolean expression with placeholders, and its parameters."""

    sql: str
    params: tuple[Any, ...]
    columns: frozenset[str]  # the filter columns it reads
    expression: Expression | None = None  # the parsed filter the SQL was rendered from


def given_filter(where: str | None) -> str | None:
    """``where`` when it holds anything but spaces, else None (no filter): what every search filters by."""
    return where if where is not None and where.strip() else None


def parse_where(text: str, columns: dict[str, str]) -> Expression:
    """Parse ``text`` against ``columns`` (name -> ``number`` | ``text``) into an expression tree;
    ``InputError`` naming the position of the first problem."""
    if len(text) > MAX_LENGTH:
        raise InputError(f"where: too long ({len(text)} characters, at most {MAX_LENGTH})", parameter="where")
    check_unicode(text)
    parser = _Parser(text, _tokenize(text), columns)
    expression = parser.expression(0)
    parser.expect_end()
    return expression


def check_unicode(text: str) -> None:
    """InputError if ``text`` holds a lone surrogate (text decoded with ``surrogateescape``, or made in
    Python): no backend could store or compare it (PostgreSQL's driver raised UnicodeEncodeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _error(text, err.start, "not valid Unicode text (a lone surrogate)") from None


def compile_where(text: str, columns: dict[str, str], quote: Callable[[str], str],
                  placeholder: str = "?", text_collation: str | None = None) -> Where:
    """Parse ``text`` against ``columns`` (name -> ``number`` | ``text``) into SQL.

    ``quote(name)`` returns the quoted SQL identifier of a known column; ``placeholder`` is
    ``?`` (sqlite3) or ``%s`` (psycopg). Text is ordered (``< <= > >=``) by code point, the order of
    SQLite's BINARY collation of UTF-8 text and of ``medvl.index.filter_columns``; a database that
    would order it by its locale is given ``text_collation``, the quoted name of a code-point
    collation (PostgreSQL: ``'"C"'``), and its ordering comparisons of text say ``COLLATE`` it.
    """
    expression = parse_where(text, columns)
    params: list[Any] = []

    def order_quote(name: str) -> str:
        collate = text_collation and columns.get(name) != NUMBER
        return f"{quote(name)} COLLATE {text_collation}" if collate else quote(name)

    sql = to_sql(expression, quote, placeholder, params, order_quote)
    return Where(sql, tuple(params), frozenset(columns_of(expression)), expression)


def to_sql(expression: Expression, quote: Callable[[str], str], placeholder: str, params: list[Any],
           order_quote: Callable[[str], str] | None = None) -> str:
    """The SQL of an expression; its literals are appended to ``params`` in placeholder order.
    ``order_quote`` (default ``quote``) names a column in ``< <= > >=`` comparisons."""
    if isinstance(expression, Junction):
        parts = [to_sql(operand, quote, placeholder, params, order_quote) for operand in expression.operands]
        return "(" + f" {expression.op.upper()} ".join(parts) + ")"
    if isinstance(expression, Not):
        return f"(NOT {to_sql(expression.operand, quote, placeholder, params, order_quote)})"
    if isinstance(expression, Compare) and expression.op in ORDERING:
        params.append(expression.value)
        return f"({(order_quote or quote)(expression.column)} {expression.op} {placeholder})"
    column = quote(expression.column)
    if isinstance(expression, IsNull):
        return f"({column} IS {'NOT ' if expression.negated else ''}NULL)"
    if isinstance(expression, Member):
        params.extend(expression.values)
        marks = ", ".join(placeholder for _ in expression.values)
        return f"({column} {'NOT ' if expression.negated else ''}IN ({marks}))"
    params.append(expression.value)
    return f"({column} {expression.op} {placeholder})"


def columns_of(expression: Expression) -> set[str]:
    """The filter columns an expression reads."""
    if isinstance(expression, Junction):
        return set().union(*(columns_of(operand) for operand in expression.operands))
    if isinstance(expression, Not):
        return columns_of(expression.operand)
    return {expression.column}


def _tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            problem = "unterminated text" if text[pos] in "'\"" else f"unexpected character {text[pos]!r}"
            raise _error(text, pos, problem)
        kind, value = match.lastgroup, match.group()
        if kind is None:  # every alternative of the token pattern is a named group
            raise _error(text, pos, f"unexpected character {text[pos]!r}")
        if kind == "string":
            tokens.append(Token("string", value, pos, value[1:-1].replace(value[0] * 2, value[0])))
        elif kind == "number":
            tokens.append(Token("number", value, pos, float(value)))
        elif kind == "name" and value.lower() in KEYWORDS:
            tokens.append(Token("keyword", value.lower(), pos))
        elif kind != "space":
            tokens.append(Token(kind, value, pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


def _error(text: str, pos: int, problem: str) -> InputError:
    shown = text if len(text) <= 80 else text[:77] + "..."
    return InputError(f"where: {problem} at position {pos + 1}: {shown!r}", parameter="where")


class _Parser:
    """Recursive descent over the tokens; builds the expression tree from known pieces only."""

    def __init__(self, text: str, tokens: list[Token], columns: dict[str, str]):
        self.text, self.tokens, self.index = text, tokens, 0
        self.columns = columns

    @property
    def token(self) -> Token:
        return self.tokens[self.index]

    def advance(self) -> Token:
        token = self.token
        self.index += 1
        return token

    def fail(self, problem: str, token: Token | None = None) -> InputError:
        token = token or self.token
        found = "the end" if token.kind == "end" else repr(token.text)
        return _error(self.text, token.pos, f"{problem}, found {found}")

    def accept(self, kind: str, text: str) -> bool:
        if self.token.kind == kind and self.token.text == text:
            self.index += 1
            return True
        return False

    def expect(self, kind: str, text: str) -> None:
        if not self.accept(kind, text):
            raise self.fail(f"expected {text!r}")

    def expect_end(self) -> None:
        if self.token.kind != "end":
            raise self.fail("expected 'and', 'or' or the end of the filter")

    def expression(self, depth: int) -> Expression:
        if depth > MAX_DEPTH:
            raise self.fail("too deeply nested")
        parts = [self.term(depth)]
        while self.accept("keyword", "or"):
            parts.append(self.term(depth))
        return parts[0] if len(parts) == 1 else Junction("or", tuple(parts))

    def term(self, depth: int) -> Expression:
        parts = [self.factor(depth)]
        while self.accept("keyword", "and"):
            parts.append(self.factor(depth))
        return parts[0] if len(parts) == 1 else Junction("and", tuple(parts))

    def factor(self, depth: int) -> Expression:
        if self.accept("keyword", "not"):
            return Not(self.factor(depth + 1))
        if self.accept("punct", "("):
            inner = self.expression(depth + 1)
            self.expect("punct", ")")
            return inner
        return self.comparison()

    def comparison(self) -> Expression:
        column = self.column()
        if self.accept("keyword", "is"):
            negated = self.accept("keyword", "not")
            self.expect("keyword", "null")
            return IsNull(column, negated)
        negated = self.accept("keyword", "not")
        if negated or self.token.kind == "keyword" and self.token.text == "in":
            self.expect("keyword", "in")
            return self.membership(column, negated)
        if self.token.kind != "op":
            raise self.fail("expected a comparison (= != < <= > >=), 'in' or 'is'")
        op = self.advance().text
        return Compare(column, "!=" if op == "<>" else op, self.literal(column))

    def membership(self, column: str, negated: bool) -> Member:
        self.expect("punct", "(")
        items = [self.literal(column)]
        while self.accept("punct", ","):
            items.append(self.literal(column))
        self.expect("punct", ")")
        return Member(column, tuple(items), negated)

    def column(self) -> str:
        token = self.token
        if token.kind != "name":
            raise self.fail("expected a column name")
        name = token.text.lower()
        if name not in self.columns:
            known = ", ".join(sorted(self.columns)) or "none"
            raise _error(self.text, token.pos, f"unknown column {token.text!r} (filter columns: {known})")
        self.index += 1
        return name

    def literal(self, column: str) -> str | float:
        token = self.token
        if token.kind not in ("string", "number"):
            raise self.fail("expected a value ('text' or a number)")
        if (token.kind == "number") != (self.columns[column] == NUMBER):
            wanted = "a number" if self.columns[column] == NUMBER else "quoted text (e.g. '1')"
            raise _error(self.text, token.pos, f"this column holds {wanted}, got {token.text}")
        if token.kind == "number" and number_problem(token.text) is not None:  # inexact, or infinite (1e400)
            raise _error(self.text, token.pos, f"{token.text} is {INEXACT_INTEGER}; a numeric column holds no such "
                                               "number (a column holding one is text), so compare with a number "
                                               "within that or use 'is not null'; an index built by an older medvl "
                                               "may hold such numbers in a numeric column: rebuild it, and the "
                                               "column is text, compared with quoted values")
        self.index += 1
        return token.value
