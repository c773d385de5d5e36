"""mrl.claims on constructed records with known answers."""

from __future__ import annotations

import pytest

from mrl.claims import check_claims, claims_markdown
from mrl.records import make_record


def _recs(method: str, metric: str, values: dict[int, list[float]]) -> list[dict]:
    return [make_record(method, p, metric, v, seed=s) for p, vs in values.items()
            for s, v in enumerate(vs)]  # fmt: skip


def _base() -> list[dict]:
    return (
        _recs("mrl", "top1", {8: [80, 82], 16: [89, 89.4], 256: [91, 91]})
        + _recs("ff", "top1", {8: [85, 85], 16: [90, 90]})
        + _recs("mrl", "probe_top1", {8: [84, 84], 16: [90, 90], 256: [91, 91]})
        + _recs("plain", "probe_top1", {8: [70, 70], 16: [88, 88], 256: [92, 92]})
        + _recs("random", "probe_top1", {8: [75, 75], 16: [88, 88], 256: [92, 92]})
        + _recs("pca", "probe_top1", {8: [86, 86], 16: [90, 90], 256: [92, 92]})
        + _recs("mrl", "1nn", {8: [80, 80], 16: [85, 85], 256: [86, 86]})
        + _recs("plain", "1nn", {8: [60, 60], 16: [84, 84], 256: [86.5, 86.5]})
        + _recs("pca", "1nn", {8: [78, 78], 16: [85, 85], 256: [86.5, 86.5]})
    )


def test_claims_decide_on_means_over_seeds():
    claims = {c.text: c for c in check_claims(_base(), "fashion-mnist")}
    within = claims["MRL top-1 at most 1 point below FF-m at every prefix m >= 16 (own heads)"]
    assert within.holds is True  # 89.2 vs 90.0: -0.8 is within 1 point
    assert "16: 89.2 vs 90.0 (-0.8)" in within.evidence
    assert "8:" not in within.evidence  # only prefixes >= 16 count
    trunc = claims[
        "MRL features above plain truncation at small prefixes (<= 8, same linear probe)"
    ]
    assert trunc.holds is True and "8: 84.0 vs 70.0 (+14.0)" in trunc.evidence
    nn = claims["MRL 1-NN at least the truncated full-size model's at every prefix"]
    assert nn.holds is False  # 86 < 86.5 at 256
    assert not any("FF-8" in t for t in claims)  # 1k-only claims absent


def test_claims_on_the_1k_task_and_missing_data():
    recs = _base()
    claims = {c.text: c for c in check_claims(recs, "fashion-mnist-1k")}
    assert claims["MRL top-1 above FF-8 at prefix 8"].holds is False  # 81 < 85
    assert claims["MRL 1-NN above PCA at prefix 8"].holds is True  # 80 > 78
    only_mrl = check_claims(_recs("mrl", "top1", {16: [90]}), "fashion-mnist")
    assert only_mrl[0].holds is None and "no top1 records" in only_mrl[0].evidence
    text = claims_markdown(list(claims.values()), [0, 1])
    assert "means over 2 seed(s)" in text and "**does NOT hold**" in text and "**holds**" in text


def test_variant_is_checked_beside_mrl_without_changing_its_verdicts():
    base = check_claims(_base(), "fashion-mnist")
    variant = (
        _recs("mrl-w", "top1", {8: [79, 79], 16: [89.5, 89.5], 256: [91, 91]})
        + _recs("mrl-w", "probe_top1", {8: [83, 83], 16: [90, 90], 256: [91.5, 91.5]})
        + _recs("mrl-w", "1nn", {8: [79, 79], 16: [85.5, 85.5], 256: [87, 87]})
    )
    claims = check_claims(_base() + variant, "fashion-mnist")
    assert claims[: len(base)] == base  # mrl's claims (and PCA's line) exactly as without it
    extra = {c.text: c for c in claims[len(base) :]}
    label = "MRL-W (MRL with per-prefix loss weights)"
    nn = extra[f"{label} 1-NN at least the truncated full-size model's at every prefix"]
    assert nn.holds is True and "256: 87.0 vs 86.5 (+0.5)" in nn.evidence  # mrl: does not hold
    assert "1nn mrl-w vs plain at 8: 79.0 vs 60.0" in nn.evidence
    assert extra[f"{label} top-1 at most 1 point below FF-m at every prefix m >= 16 "
                 "(own heads)"].holds
    cost = extra[f"{label} against MRL (informational)"]
    assert cost.holds is None
    assert "top1 mrl-w vs mrl at 8: 79.0 vs 81.0 (-2.0)" in cost.evidence
    assert "1nn mrl-w vs mrl at 8: 79.0 vs 80.0 (-1.0)" in cost.evidence
    k1 = {c.text: c for c in check_claims(_base() + variant, "fashion-mnist-1k")}
    assert k1[f"{label} top-1 above FF-8 at prefix 8"].holds is False  # 79 < 85
    assert k1[f"{label} 1-NN above PCA at prefix 8"].holds is True  # 79 > 78


def test_means_pair_seeds_and_missing_prefixes_leave_a_claim_undecided():
    # mrl has seeds 0 and 1, ff only seed 1: compared on seed 1 alone (mixing seed sets would
    # compare 89.5 = mean(89, 90) with 90 and call a 1-point miss a 0.5-point one).
    recs = _recs("mrl", "top1", {16: [95, 88.5], 32: [95, 90]}) + [
        make_record("ff", 16, "top1", 90.0, seed=1),
        make_record("ff", 32, "top1", 90.0, seed=1),
    ]
    within = check_claims(recs, "fashion-mnist")[0]
    assert within.holds is False and "16: 88.5 vs 90.0 (-1.5)" in within.evidence
    assert "(seeds both have: [1])" in within.evidence
    # FF has 64, MRL does not: not counted as holding.
    recs = _recs("mrl", "top1", {16: [90], 32: [90]}) + _recs("ff", "top1", {16: [90], 32: [90],
                                                                           64: [90]})
    within = check_claims(recs, "fashion-mnist")[0]
    assert within.holds is None and "no records of both at [64]" in within.evidence
    recs += [make_record("ff", 16, "top1", 99.0, seed=0)]  # seed 0's FF-16: mean(90, 99)
    with pytest.warns(UserWarning, match="repeat a seed"):
        assert check_claims(recs, "fashion-mnist")[0].holds is False  # a failing prefix decides


def test_a_recipe_ff_size_without_records_leaves_the_ff_claim_undecided():
    """FF-16 never ran (a crashed --only process): the claim was decided on 256 alone."""
    recs = _recs("mrl", "top1", {16: [89.0], 256: [91.0]}) + _recs("ff", "top1", {256: [91.5]})
    assert check_claims(recs, "fashion-mnist")[0].holds is True  # what the records hold
    within = check_claims(recs, "fashion-mnist", ff_sizes=(2, 4, 8, 16))[0]
    assert within.holds is None and "no records of both at [16]" in within.evidence
    recs += _recs("ff", "top1", {16: [89.5]})
    assert check_claims(recs, "fashion-mnist", ff_sizes=(2, 4, 8, 16))[0].holds is True


def test_an_exact_one_point_gap_of_stored_float32_values_holds():
    """63.01 vs 64.01 (100 of 10k images) are stored as float32: the gap read -1.0000038."""
    import numpy as np

    a, b = float(np.float32(63.01)), float(np.float32(64.01))
    recs = [make_record("mrl", 16, "top1", a, seed=0), make_record("ff", 16, "top1", b, seed=0)]
    assert check_claims(recs, "fashion-mnist")[0].holds is True
    recs[1] = make_record("ff", 16, "top1", float(np.float32(64.02)), seed=0)
    assert check_claims(recs, "fashion-mnist")[0].holds is False


def test_records_without_a_value_are_left_out_and_pooled_seeds_warn():
    recs = _base() + [make_record("mrl", 32, "1nn", float("nan"), seed=0)]  # stored as null
    assert recs[-1]["value"] is None
    claims = {c.text: c for c in check_claims(recs, "fashion-mnist")}  # crashed on float(None)
    assert "32:" not in claims["MRL 1-NN at least the truncated full-size model's at every "
                               "prefix"].evidence
    twice = _base() + [make_record("plain", 8, "1nn", 99.0, seed=0)]  # a seed recorded twice
    with pytest.warns(UserWarning, match=r"check_claims: a cell's mean ± std is not over seeds "
                      r"of one setting: method='plain' metric='1nn' prefix=8"):
        check_claims(twice, "fashion-mnist")
