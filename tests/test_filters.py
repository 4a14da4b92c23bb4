"""The filter language: each operator and type, errors that say where, and hostile input."""
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from serve.filters import MAX_IN, MAX_LENGTH, MAX_TERMS, Columns, FilterError, Term, parse

COLS = {"in_stock": "bool", "brand": "string", "price": "float", "stock": "int"}
TABLE = pa.table({
    "in_stock": pa.array([True, False, True, None, True]),
    "brand": pa.array(["acme", "zeta", 'q"uote', "acme", None]),
    "price": pa.array([10.0, 99.5, 100.0, None, 250.0]),
    "stock": pa.array([0, 5, 12, 7, None], pa.int64()),
})


def rows(expr):
    return list(np.flatnonzero(Columns(TABLE).mask(parse(expr, COLS))))


def test_the_documented_example_parses():
    terms = parse('in_stock = true AND price < 100 AND brand IN ("a", "b")', COLS)
    assert terms == (Term("in_stock", "=", (True,)), Term("price", "<", (100,)), Term("brand", "in", ("a", "b")))


@pytest.mark.parametrize("expr,expected", [
    ("in_stock = true", [0, 2, 4]),
    ("in_stock != true", [1]),               # null matches nothing, not even !=
    ("brand = 'acme'", [0, 3]),
    ('brand != "acme"', [1, 2]),
    ('brand = "q\\"uote"', [2]),
    ("brand IN ('zeta', 'nope')", [1]),
    ("price < 100", [0, 1]),
    ("price <= 100", [0, 1, 2]),
    ("price > 99.5", [2, 4]),
    ("price >= 99.5", [1, 2, 4]),
    ("stock = 5", [1]),
    ("stock IN (0, 12)", [0, 2]),
    ("price > 1e2", [4]),
    ("in_stock = true and price < 200 AND stock >= 0", [0, 2]),
    ("brand = 'missing'", []),
])
def test_each_operator_and_type(expr, expected):
    assert rows(expr) == expected


@pytest.mark.parametrize("expr,needle", [
    ("colour = 'red'", "unknown column 'colour' at position 0"),
    ("price < 'cheap'", "'price' is float"),
    ("brand < 'b'", "< needs a number column; 'brand' is string"),
    ("brand = acme", "strings need quotes"),
    ("in_stock = 1", "'in_stock' is bool"),
    ("stock = 1.5", "'stock' is int"),
    ("price < 100 price > 1", "expected AND at position 12"),
    ("price < 100 OR price > 1", "OR is not supported (position 12)"),
    ("(price < 100)", "parentheses are not supported (position 0)"),
    ("price <", "ends early at position 7"),
    ("price ~ 3", "unexpected character '~' at position 6"),
    ("brand IN ('a' 'b')", "expected ',' or ')' at position 14"),
    ("", "empty expression"),
    ("price < 1 AND", "ends early"),
    ("brand = 'unterminated", "unexpected character"),
])
def test_errors_name_the_column_or_the_position(expr, needle):
    with pytest.raises(FilterError) as err:
        parse(expr, COLS)
    assert needle in str(err.value)


def test_limits():
    with pytest.raises(FilterError, match="limit is"):
        parse("price < 1 AND " * 200 + "price < 2", COLS)
    with pytest.raises(FilterError, match=f"more than {MAX_TERMS} terms"):
        parse(" AND ".join(["price < 1"] * (MAX_TERMS + 1)), COLS)
    with pytest.raises(FilterError, match=f"longer than {MAX_IN}"):
        parse("stock IN (" + ",".join(["1"] * (MAX_IN + 1)) + ")", COLS)
    assert len(parse(" AND ".join(["price < 1"] * MAX_TERMS), COLS)) == MAX_TERMS
    with pytest.raises(FilterError, match="NUL"):
        parse("brand = 'a\x00'", COLS)


def test_deep_nesting_and_unicode_are_refused_cleanly():
    with pytest.raises(FilterError, match="parentheses"):
        parse("(" * 900 + "price < 1" + ")" * 900, COLS)
    assert parse("brand = 'ünïcødé 👗'", COLS) == (Term("brand", "=", ("ünïcødé 👗",)),)
    with pytest.raises(FilterError, match="unexpected character"):
        parse("prïce < 1", COLS)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_text_parses_or_is_refused_with_a_filter_error(text):
    try:
        terms = parse(text, COLS)
    except FilterError as exc:
        assert str(exc).startswith("filter: ")
        return
    Columns(TABLE).mask(terms)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["price", "<", "=", "IN", "(", ")", ",", "'a'", "1", "AND", "true", "brand",
                                 "stock", ">=", "!=", "\\", '"', "OR", "-", "1e999"]), max_size=60))
def test_token_soup_parses_or_is_refused(parts):
    try:
        parse(" ".join(parts), COLS)
    except FilterError:
        pass


def test_length_limit_is_checked_before_any_work():
    with pytest.raises(FilterError, match=str(MAX_LENGTH)):
        parse("x" * (MAX_LENGTH + 1), COLS)
