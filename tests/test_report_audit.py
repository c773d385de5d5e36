"""Audit of records -> tables / plots / HTML: each value checked against an independent
computation on hand-built records (statistics.stdev, the figure's own line data, the HTML parsed
back), plus the fixes: append replaces a rerun seed, strict JSON, non-finite values blank,
warnings for cells that are not seeds of one setting, a '|' inside a name."""

import json
import math
import statistics
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest

from mrl.records import load_records, make_record, save_records, to_markdown
from mrl.report import plot_metric, write_report


def _rows(table: str) -> list[list[str]]:
    """A to_markdown table as cells (column pipes only; an escaped '\\|' stays in its cell)."""
    import re

    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            for line in table.splitlines()]


def _records():
    """Three seeds of mrl at 8..1024 (one missing cell at 64), two seeds of pca, one of ff."""
    values = {0: [61.0, 70.0, 80.0, 85.0, 88.0, 89.0, 90.0, 91.0],
              1: [63.5, 72.0, 79.0, 86.0, 88.5, 89.5, 90.5, 91.5],
              2: [66.0, 74.5, 81.5, 87.0, 89.0, 90.0, 91.0, 92.0]}
    prefixes = [8, 16, 32, 64, 128, 256, 512, 1024]
    recs = []
    for seed, vals in values.items():
        for p, v in zip(prefixes, vals):
            if p != 64:
                recs.append(make_record("mrl", p, "top1", v, seed=seed, dataset="d"))
            if seed < 2:
                recs.append(make_record("pca", p, "top1", v - 5 - seed, seed=seed, dataset="d"))
    recs.append(make_record("ff", 16, "top1", 55.25, seed=0, dataset="d"))
    return recs, values, prefixes


def test_table_cells_are_mean_and_sample_std_of_the_right_records():
    recs, values, prefixes = _records()
    rows = _rows(to_markdown(recs, metric="top1"))
    assert rows[0][2:] == [str(p) for p in prefixes]  # numeric order: 1024 last, not after 128
    table = {r[0]: dict(zip(prefixes, r[2:])) for r in rows[2:]}
    for i, p in enumerate(prefixes):
        mrl = [values[s][i] for s in range(3)]
        want = "" if p == 64 else f"{statistics.mean(mrl):.1f} ± {statistics.stdev(mrl):.1f}"
        assert table["mrl"][p] == want  # missing cell blank, not 0
        pca = [values[0][i] - 5, values[1][i] - 6]
        assert table["pca"][p] == f"{statistics.mean(pca):.1f} ± {statistics.stdev(pca):.1f}"
    assert table["ff"] == {p: ("55.2" if p == 16 else "") for p in prefixes}  # one seed: no ±
    # the sample std (n - 1), not the population one: 61 / 63.5 / 66 -> 2.5, not 2.04
    assert table["mrl"][8] == "63.5 ± 2.5"


def test_plot_has_one_line_per_method_on_log2_x_with_the_record_means(monkeypatch):
    import matplotlib.pyplot as plt

    recs, values, prefixes = _records()
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    assert plot_metric(recs, "top1")[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["ff", "mrl", "pca"]
    mrl_x = [p for p in prefixes if p != 64]
    assert list(lines["mrl"].get_xdata()) == mrl_x
    want = [statistics.mean(values[s][prefixes.index(p)] for s in range(3)) for p in mrl_x]
    assert np.allclose(lines["mrl"].get_ydata(), want)
    assert list(lines["ff"].get_xdata()) == [16] and list(lines["ff"].get_ydata()) == [55.25]
    real_close(fig)


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_html_tables_equal_the_markdown_tables(tmp_path):
    recs, _, _ = _records()
    recs += [make_record("a|b <i>", p, "map@10", 0.25 * p, seed=0) for p in (8, 16)]
    paths = write_report(recs, tmp_path, "t")
    md = paths["markdown"].read_text()
    parser = _Tables()
    parser.feed(paths["html"].read_text())
    for metric, html_table in zip(("top1", "map@10"), parser.tables, strict=True):
        table = to_markdown(recs, metric=metric)
        assert table in md
        rows = _rows(table)
        assert html_table == [rows[0], *rows[2:]]
    assert parser.tables[1][1][:2] == ["a|b <i>", "map@10"]  # one cell, not two columns


def test_a_pipe_in_a_name_stays_in_its_column():
    rows = _rows(to_markdown([make_record("ft|v2", 8, "m", 1.0)]))
    assert rows[2] == ["ft|v2", "m", "1.000"]


def test_append_accumulates_seeds_and_a_rerun_replaces(tmp_path):
    path = tmp_path / "results.json"
    save_records(path, [make_record("mrl", 8, "1nn", 0.5, seed=0)])
    save_records(path, [make_record("mrl", 8, "1nn", 0.7, seed=1)], append=True)
    save_records(path, [make_record("mrl", 8, "1nn", 0.6, seed=0)], append=True)  # rerun seed 0
    recs = load_records(path)
    assert sorted((r["seed"], r["value"]) for r in recs) == [(0, 0.6), (1, 0.7)]
    assert "| mrl | 1nn | 0.6500 ± 0.0707 |" in to_markdown(recs)


def test_append_keeps_repeated_measurements_without_a_seed(tmp_path):
    """A benchmark run again (records without a seed, e.g. benchmarks/bench_serve.py) adds its
    measurements; the table averages them without a warning."""
    path = tmp_path / "bench.json"
    save_records(path, [make_record("batching", None, "texts/s", 11.8)])
    save_records(path, [make_record("batching", None, "texts/s", 21.0)], append=True)
    assert sorted(r["value"] for r in load_records(path)) == [11.8, 21.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "16.4 ± 6.5" in to_markdown(load_records(path))


def test_save_records_writes_strict_json(tmp_path):
    path = tmp_path / "r.json"
    recs = [
        {"method": "a", "prefix": 8, "metric": "m", "value": np.float32(0.5), "seed": np.int64(1),
         "center": np.bool_(True), "std": float("nan"), "sizes": np.array([8, 16])},
        {"method": "a", "prefix": 16, "metric": "m", "value": float("inf"), "seed": 1},
    ]
    save_records(path, recs)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data == [
        {"method": "a", "prefix": 8, "metric": "m", "value": 0.5, "seed": 1, "center": True,
         "std": None, "sizes": [8, 16]},
        {"method": "a", "prefix": 16, "metric": "m", "value": None, "seed": 1},
    ]
    assert load_records(path) == data


def test_save_records_names_what_json_cannot_hold(tmp_path):
    bad = make_record("a", 8, "m", 0.5, config=object())
    with pytest.raises(ValueError, match=r"records\[0\]\['config'\] cannot be written as JSON"):
        save_records(tmp_path / "r.json", [bad])
    assert not (tmp_path / "r.json").exists()


def test_value_must_be_a_number(tmp_path):
    with pytest.raises(ValueError, match=r"records\[1\] value must be a number or None, "
                                         r"got value='0.5'"):
        save_records(tmp_path / "r.json", [make_record("a", 8, "m", 0.5),
                                           {**make_record("a", 16, "m", 0), "value": "0.5"}])


def test_nonfinite_values_in_a_file_are_blank_cells_and_no_points(tmp_path, monkeypatch):
    """A file written by hand or an older version may hold NaN / Infinity (Python's json
    reads them): the table leaves the cell blank and the plot skips the point."""
    path = tmp_path / "old.json"
    path.write_text('[{"method": "a", "prefix": 8, "metric": "m", "value": NaN},'
                    ' {"method": "a", "prefix": 16, "metric": "m", "value": Infinity},'
                    ' {"method": "a", "prefix": 32, "metric": "m", "value": 0.5}]')
    recs = load_records(path)
    assert math.isnan(recs[0]["value"])
    assert _rows(to_markdown(recs))[2] == ["a", "m", "0.5000"]
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_metric(recs, "m")
    (line,) = figures[0].axes[0].get_lines()
    assert list(line.get_xdata()) == [32] and list(line.get_ydata()) == [0.5]


@pytest.mark.parametrize(
    ("recs", "why"),
    [
        ([make_record("a", 8, "m", v, seed=0) for v in (0.5, 0.7)], "repeat a seed"),
        ([make_record("a", 8, "m", 0.5, seed=0, dataset="x"),
          make_record("a", 8, "m", 0.7, seed=1, dataset="y")], r"differ in \['dataset'\]"),
        ([make_record("a", 8, "m", 0.5, seed=0, center=False),
          make_record("a", 8, "m", 0.7, seed=1, center=True)], r"differ in \['center'\]"),
    ],
)
def test_a_cell_that_is_not_seeds_of_one_setting_warns(recs, why):
    with pytest.warns(UserWarning, match=rf"method='a' metric='m' prefix=8 \(2 records that {why}"):
        assert "0.6000 ± 0.1414" in to_markdown(recs)


def test_seeds_of_one_setting_do_not_warn():
    recs, _, _ = _records()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_markdown(recs)
