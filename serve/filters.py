"""Result filters: a small expression language over the index's filter columns, compiled to masks.

    in_stock = true AND price < 100 AND brand IN ("acme", "zeta")

Grammar: ``term (AND term)*``; a term is ``column OP literal`` (OP one of = != < <= > >=) or
``column IN (literal, ...)``. Literals: ``true``/``false``, numbers, and strings in double or
single quotes (backslash escapes the quote or a backslash). Columns and their types come from
``index.filter_columns``; a comparison must fit the column's type (ordering only on int/float).
A row whose value is null matches no term. Every error is a FilterError that names the column
or the character position, so the service answers 400 with it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

MAX_LENGTH = 2000
MAX_TERMS = 32
MAX_IN = 256
OPS = ("=", "!=", "<", "<=", ">", ">=")
_TOKEN = re.compile(r"""\s*(?:(?P<op><=|>=|!=|=|<|>)|(?P<punct>[(),])|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
                        |(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.]))|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""",
                    re.VERBOSE)
_END = re.compile(r"\s*\Z")


class FilterError(ValueError):
    """A filter the service refuses (HTTP 400); the message says where and why."""


@dataclass(frozen=True)
class Term:
    column: str
    op: str  # one of OPS or "in"
    values: tuple


def _tokens(text: str) -> list[tuple[str, object, int]]:
    out, at = [], 0
    while not _END.match(text, at):
        m = _TOKEN.match(text, at)
        if not m:
            pos = at + len(text[at:]) - len(text[at:].lstrip())
            raise FilterError(f"filter: unexpected character {text[pos]!r} at position {pos}")
        kind = m.lastgroup
        start = m.start(kind)
        raw = m.group(kind)
        if kind == "str":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1], flags=re.S)
        elif kind == "num":
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        else:
            value = raw
        out.append((kind, value, start))
        at = m.end()
    return out


def parse(text: str, columns: dict[str, str]) -> tuple[Term, ...]:
    """The terms of ``text`` (all must hold), checked against ``columns`` (name -> type)."""
    if not isinstance(text, str):
        raise FilterError("filter: must be a string")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter: {len(text)} characters, the limit is {MAX_LENGTH}")
    if "\x00" in text:
        raise FilterError(f"filter: NUL character at position {text.index(chr(0))}")
    tokens = _tokens(text)
    if not tokens:
        raise FilterError("filter: empty expression")
    terms, i = [], 0
    while True:
        term, i = _term(tokens, i, columns, len(text))
        terms.append(term)
        if len(terms) > MAX_TERMS:
            raise FilterError(f"filter: more than {MAX_TERMS} terms")
        if i == len(tokens):
            return tuple(terms)
        kind, value, pos = tokens[i]
        if kind == "word" and str(value).upper() == "AND":
            i += 1
            continue
        if kind == "word" and str(value).upper() == "OR":
            raise FilterError(f"filter: OR is not supported (position {pos}); use IN (...) for alternatives")
        raise FilterError(f"filter: expected AND at position {pos}, got {_show(value)}")


def _show(value) -> str:
    return repr(value)[:40]


def _term(tokens, i, columns, end) -> tuple[Term, int]:
    def at(j):
        if j >= len(tokens):
            raise FilterError(f"filter: expression ends early at position {end}")
        return tokens[j]

    kind, name, pos = at(i)
    if kind == "punct" and name == "(":
        raise FilterError(f"filter: parentheses are not supported (position {pos}); terms are joined by AND")
    if kind != "word" or str(name).upper() in ("AND", "IN", "TRUE", "FALSE"):
        raise FilterError(f"filter: expected a column name at position {pos}, got {_show(name)}")
    if name not in columns:
        known = ", ".join(sorted(columns)) or "none (index.filter_columns is empty)"
        raise FilterError(f"filter: unknown column {name!r} at position {pos}; filter columns: {known}")
    ctype = columns[name]
    kind, op, pos = at(i + 1)
    if kind == "word" and str(op).upper() == "IN":
        kind, p, ppos = at(i + 2)
        if p != "(":
            raise FilterError(f"filter: expected '(' after IN at position {ppos}")
        values, j = [], i + 3
        while True:
            kind, v, vpos = at(j)
            values.append(_literal(kind, v, vpos, name, ctype))
            if len(values) > MAX_IN:
                raise FilterError(f"filter: IN list of {name!r} longer than {MAX_IN}")
            kind, p, ppos = at(j + 1)
            if p == ")":
                return Term(name, "in", tuple(values)), j + 2
            if p != ",":
                raise FilterError(f"filter: expected ',' or ')' at position {ppos}")
            j += 2
    if kind != "op":
        raise FilterError(f"filter: expected an operator (= != < <= > >= IN) after {name!r} at position {pos}")
    if op not in ("=", "!=") and ctype not in ("int", "float"):
        raise FilterError(f"filter: {op} needs a number column; {name!r} is {ctype} (position {pos})")
    kind, v, vpos = at(i + 2)
    return Term(name, op, (_literal(kind, v, vpos, name, ctype),)), i + 3


def _literal(kind, value, pos, name, ctype):
    if ctype == "bool":
        if kind == "word" and str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    elif ctype == "string":
        if kind == "str":
            return value
    elif kind == "num":
        if ctype == "int" and isinstance(value, float):
            if not value.is_integer():
                raise FilterError(f"filter: {name!r} is int; {value} at position {pos} is not")
            value = int(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"filter: number out of range at position {pos}")
        return value
    raise FilterError(f"filter: {name!r} is {ctype}; {_show(value)} at position {pos} is not a {ctype} literal"
                      + (" (strings need quotes)" if ctype == "string" and kind == "word" else ""))


# ---------------------------------------------------------------- masks over a shard's attributes


class Columns:
    """A shard's filter columns as NumPy, aligned to its Annoy positions: numbers and bools with a
    validity mask, strings dictionary-encoded (codes, -1 for null), so a term is one vector op."""

    def __init__(self, table):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.n = table.num_rows
        self.data: dict[str, tuple] = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                enc = pc.dictionary_encode(col)
                codes = np.asarray(enc.indices.fill_null(-1).to_numpy(zero_copy_only=False), np.int32)
                self.data[name] = ("string", {v: k for k, v in enumerate(enc.dictionary.to_pylist())}, codes, valid)
            elif pa.types.is_boolean(col.type):
                self.data[name] = ("bool", None, np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False)), valid)
            else:
                self.data[name] = ("num", None, np.asarray(col.cast(pa.float64()).fill_null(0).to_numpy()), valid)

    def mask(self, terms: tuple[Term, ...]) -> np.ndarray:
        out = np.ones(self.n, bool)
        for t in terms:
            if t.column not in self.data:
                raise FilterError(f"filter: column {t.column!r} is not in this index version "
                                  f"(it has {sorted(self.data) or 'no filter columns'})")
            out &= self._term(t)
        return out

    def _term(self, t: Term) -> np.ndarray:
        kind, lookup, values, valid = self.data[t.column]
        if kind == "string":
            codes = [lookup[v] for v in t.values if v in lookup]
            hit = np.isin(values, codes) if codes else np.zeros(self.n, bool)
            return valid & (~hit if t.op == "!=" else hit)
        if t.op == "in":
            return valid & np.isin(values, np.asarray(t.values, values.dtype))
        v = t.values[0]
        op = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
              ">=": np.greater_equal}[t.op]
        return valid & op(values, v)
