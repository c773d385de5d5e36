import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mrl import Nesting


def test_doubling_power_of_two():
    assert Nesting.doubling(8, 2048).sizes == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def test_doubling_not_power_of_two_keeps_full_size_last():
    assert Nesting.doubling(8, 384).sizes == (8, 16, 32, 64, 128, 256, 384)
    assert Nesting.doubling(8, 8).sizes == (8,)
    assert Nesting.doubling(3, 7).sizes == (3, 6, 7)


def test_defaults_and_accessors():
    n = Nesting((2, 4, 10))
    assert n.dim == 10
    assert n.weights == (1.0, 1.0, 1.0)
    assert len(n) == 3 and list(n) == [2, 4, 10]
    assert 4 in n and 5 not in n
    assert n.index(4) == 1
    assert n.chunks == ((0, 2), (2, 4), (4, 10))


def test_immutable():
    n = Nesting((2, 4))
    with pytest.raises(AttributeError):
        n.sizes = (1, 2)  # type: ignore[misc]


def test_numpy_ints_accepted():
    n = Nesting(tuple(np.array([4, 8], dtype=np.int64)))
    assert n.sizes == (4, 8) and all(type(s) is int for s in n.sizes)


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((), r"sizes must not be empty"),
        ((8, 8), r"strictly increasing, got sizes\[1\]=8 after sizes\[0\]=8"),
        ((16, 8), r"strictly increasing, got sizes\[1\]=8"),
        ((0, 8), r"positive, got sizes\[0\]=0"),
        ((-4, 8), r"positive, got sizes\[0\]=-4"),
        ((4.5, 8), r"sizes\[0\] must be an integer, got sizes\[0\]=4.5"),
        ((True, 8), r"sizes\[0\] must be an integer, got sizes\[0\]=True"),
    ],
)
def test_invalid_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        Nesting(sizes)


@pytest.mark.parametrize(
    "weights, match",
    [
        ((1.0,), r"one entry per prefix \(2\), got 1"),
        ((1.0, -1.0), r"weights\[1\]=-1.0"),
        ((1.0, float("nan")), r"weights\[1\]=nan"),
        ((0.0, 0.0), r"must not all be zero"),
        ("12", r"weights must be numbers, one per prefix, got weights='12'"),
    ],
)
def test_invalid_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        Nesting((4, 8), weights)


def test_doubling_errors():
    with pytest.raises(ValueError, match="start must be positive, got start=0"):
        Nesting.doubling(0, 16)
    with pytest.raises(ValueError, match="dim must be >= start, got dim=4 < start=8"):
        Nesting.doubling(8, 4)


def test_parse():
    assert Nesting.parse("8, 16,32").sizes == (8, 16, 32)
    assert Nesting.parse("doubling:8", dim=100).sizes == (8, 16, 32, 64, 100)
    assert Nesting.parse("full", dim=12).sizes == (12,)
    assert Nesting.parse([2, 4]).sizes == (2, 4)
    with pytest.raises(ValueError, match="needs the embedding dim"):
        Nesting.parse("doubling:8")
    with pytest.raises(ValueError, match="not a comma-separated list"):
        Nesting.parse("8,x")
    with pytest.raises(ValueError, match=r"ends at 32, but the embedding dim is 64"):
        Nesting.parse("8,16,32", dim=64)


def test_index_and_check_dim_errors():
    n = Nesting((4, 8))
    with pytest.raises(ValueError, match=r"prefix 5 is not in the nesting \[4, 8\]"):
        n.index(5)
    with pytest.raises(ValueError, match=r"queries have dimension 7, but the nesting \[4, 8\]"):
        n.check_dim(7, "queries")


def test_truncated():
    assert Nesting((8, 16, 32, 64)).truncated(20).sizes == (8, 16, 20)
    assert Nesting((8, 16, 32)).truncated(16).sizes == (8, 16)


@given(
    st.lists(st.integers(1, 5000), min_size=1, max_size=12, unique=True),
    st.booleans(),
)
def test_json_round_trip(sizes, with_weights):
    sizes = sorted(sizes)
    weights = [float(i + 1) for i in range(len(sizes))] if with_weights else None
    n = Nesting(tuple(sizes), weights)
    again = Nesting.from_json(n.to_json())
    assert again == n
    assert json.loads(n.to_json())["sizes"] == sizes


def test_from_dict_errors():
    with pytest.raises(ValueError, match="with 'sizes'"):
        Nesting.from_dict({"size": [1]})
    with pytest.raises(ValueError, match=r"unknown nesting keys \['extra'\]"):
        Nesting.from_dict({"sizes": [1], "extra": 1})


def test_parse_refuses_empty_items_but_allows_a_trailing_comma():
    assert Nesting.parse("8, 16,").sizes == (8, 16)
    with pytest.raises(ValueError, match=r"nesting spec '8,,16' is not a comma-separated list"):
        Nesting.parse("8,,16")


def test_truncated_keeps_the_weights():
    n = Nesting((8, 16, 32), weights=(1, 2, 3))
    assert n.truncated(16).weights == (1.0, 2.0)
    assert n.truncated(20).to_dict() == {"sizes": [8, 16, 20], "weights": [1.0, 2.0, 3.0]}
