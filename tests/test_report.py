"""write_report renders a small report: JSON round-trip, tables, PNGs, self-contained HTML."""

import json

import pytest

from mrl.records import load_records, make_record
from mrl.report import plot_metric, write_report


def _records():
    recs = []
    for seed, bump in ((0, 0.0), (1, 0.02)):
        for m, v in ((8, 0.5), (16, 0.6), (32, 0.7)):
            recs.append(make_record("mrl", m, "1nn", v + bump, seed=seed))
            recs.append(make_record("pca", m, "1nn", v - 0.1, seed=seed))
            recs.append(make_record("mrl", m, "map@10", v / 2, seed=seed))
    return recs


def test_write_report_files(tmp_path):
    recs = _records()
    paths = write_report(
        recs,
        tmp_path / "rep",
        "Toy <eval>",
        notes="two seeds",
        sections=[("Setup", "ResNet-18, *2 seeds*"), ("Raw", "<p id='x'>hi</p>")],
    )
    assert set(paths) == {"json", "markdown", "html", "1nn", "map@10"}
    assert load_records(paths["json"]) == recs
    md = paths["markdown"].read_text()
    assert md.startswith("# Toy <eval>") and "## 1nn" in md and "## map@10" in md
    assert "| mrl | 1nn | 0.5100 ± 0.0141 |" in md  # mean ± std over the two seeds
    assert paths["map@10"].name == "map_at_10.png"
    for metric in ("1nn", "map@10"):
        assert paths[metric].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert "<title>Toy &lt;eval&gt;</title>" in page
    assert page.count("data:image/png;base64,") == 2  # self-contained
    assert "<p id='x'>hi</p>" in page and "*2 seeds*" in page and "<td>pca</td>" in page
    assert not list((tmp_path / "rep").glob(".*.tmp"))  # atomic writes left no temp files


def test_plot_skips_prefixless_and_report_without_plots(tmp_path):
    recs = [make_record("bench", None, "seconds", 1.5)]
    assert plot_metric(recs, "seconds") is None
    paths = write_report(recs, tmp_path, "Bench", plots=False)
    assert set(paths) == {"json", "markdown", "html"}
    assert json.loads(paths["json"].read_text())[0]["value"] == 1.5


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"records must not be empty"):
        write_report([], tmp_path, "x")
    with pytest.raises(ValueError, match=r"records\[0\] lacks keys"):
        write_report([{"method": "a"}], tmp_path, "x")
    with pytest.raises(ValueError, match=r"sections\[0\] must be a \(heading, text\) pair"):
        write_report(_records(), tmp_path, "x", sections=["oops"])


def test_report_without_matplotlib_keeps_tables(tmp_path, monkeypatch):
    """A device machine may lack matplotlib: the report is written without PNGs (a warning),
    instead of failing after a long run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_report(_records(), tmp_path, "t")
    assert set(paths) == {"json", "markdown", "html"}
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "report.html").is_file()


def test_section_markdown_becomes_html_and_its_image_is_embedded(tmp_path):
    """The demo's sections (tables, bold headline, its cascade.png) showed as escaped markdown
    in <pre>, the image as the text '![...](cascade.png)'."""
    out = tmp_path / "rep"
    out.mkdir()
    png = b"\x89PNG\r\n\x1a\nfake"
    (out / "cascade.png").write_bytes(png)
    section = ("Intro with `code` and a <tag>.\n\n**Headline: 2.9 x smaller.**\n\n### Curve\n\n"
               "| method | metric | 8 |\n|---|---|---|\n| mrl | top1 | 88.1 |\n\n"
               "![cascade: accuracy](cascade.png)\n\n![elsewhere](../secret.png)\n\n- one\n- two")
    page = write_report(_records(), out, "x", sections=[("Cascade", section)],
                        plots=False)["html"].read_text()
    body = page.split("<h2>Cascade</h2>", 1)[1]
    assert "<pre>" not in body
    assert "<p>Intro with <code>code</code> and a &lt;tag&gt;.</p>" in body
    assert "<p><b>Headline: 2.9 x smaller.</b></p>" in body and "<h4>Curve</h4>" in body
    assert "<tr><td>mrl</td><td>top1</td><td>88.1</td></tr>" in body
    import base64

    assert f"src='data:image/png;base64,{base64.b64encode(png).decode()}'" in body
    assert "<a href='../secret.png'>elsewhere</a>" in body  # only the report's own files
    assert "<ul><li>one</li><li>two</li></ul>" in body
    captioned = "Caption right above:\n| a | b |\n|---|---|\n| 1 | 2 |\n\n![x](javascript:alert)"
    page = write_report(_records(), out, "x", sections=[("C", captioned)],
                        plots=False)["html"].read_text()
    body = page.split("<h2>C</h2>", 1)[1]
    assert "<p>Caption right above:</p>\n<table>" in body and "<td>1</td><td>2</td>" in body
    assert "href" not in body  # no link to a scheme
