"""The scripts in examples/ run end to end in their --quick mode and print honest results."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
from scripts import load_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    return load_script("examples", name)


def _table_rows(out: str) -> dict[tuple[str, str], list[float]]:
    """{(method, metric): values per prefix column} of a `mrl.records.to_markdown` table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] != "method" and re.fullmatch(r"-?[\d.]+", cells[2]):
            rows[(cells[0], cells[1])] = [float(c) for c in cells[2:]]
    return rows


def _header_prefixes(out: str) -> list[int]:
    line = next(x for x in out.splitlines() if x.startswith("| method | metric |"))
    return [int(c) for c in line.strip("| \n").split("|")[2:]]


def test_examples_have_docstring_quick_flag_and_readme():
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert names == ["custom_encoder", "frozen_embeddings_adaptor", "funnel_search"]
    readme = (EXAMPLES / "README.md").read_text()
    for name in names:
        text = (EXAMPLES / f"{name}.py").read_text()
        assert text.startswith('"""') and "Run:" in text and "--quick" in text, name
        assert f"examples/{name}.py" in readme, name


def test_custom_encoder(tmp_path, capsys):
    records = _load("custom_encoder").main(["--quick", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert _header_prefixes(out) == [2, 4, 8, 16, 32, 64]  # one column per prefix of the nesting
    rows = _table_rows(out)
    assert set(rows) == {("mrl", "top1"), ("mrl", "1nn"), ("mrl", "map@10"), ("mrl", "p@10")}
    assert all(len(v) == 6 for v in rows.values())
    # 10 classes (chance 10%): the trained encoder and heads must have learned something
    assert rows[("mrl", "top1")][-1] > 30 and rows[("mrl", "1nn")][-1] > 50, out
    assert {r["prefix"] for r in records} == {2, 4, 8, 16, 32, 64}


def test_custom_encoder_runs_twice_in_one_process(tmp_path, capsys):
    """The encoder registration is process-wide: a second main() must not fail on it."""
    module = _load("custom_encoder")
    module.main(["--quick", "--epochs", "1", "--out", str(tmp_path / "a")])
    module.main(["--quick", "--epochs", "1", "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "checkpoint.pt").is_file()


def test_frozen_embeddings_adaptor(capsys):
    records = _load("frozen_embeddings_adaptor").main(["--quick"])
    out = capsys.readouterr().out
    assert _header_prefixes(out) == [8, 16, 32, 64, 128]
    rows = _table_rows(out)
    assert {m for m, _ in rows} == {"truncate", "pca", "adaptor"}
    truncate, adaptor = rows[("truncate", "recall@10")], rows[("adaptor", "recall@10")]
    assert adaptor[0] > truncate[0] + 0.1, out  # the point of the adaptor: small prefixes
    # a rotation keeps full-size cosines: every method equals exact search at D
    full = [r["value"] for r in records if r["prefix"] == 128]
    assert len(full) == 3 and min(full) >= 0.99, full


def test_frozen_embeddings_adaptor_needs_model_and_texts_together():
    with pytest.raises(SystemExit):
        _load("frozen_embeddings_adaptor").main(["--model", "default"])


def test_funnel_search(tmp_path, capsys):
    stats = _load("funnel_search").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "funnel.index").is_dir()
    assert stats["recall"] >= 0.95, stats  # measured 1.000 with D_s=32, K=200 at N=20k
    assert stats["same_after_reload"] is True
    assert stats["exact_qps"] > 0 and stats["funnel_qps"] > 0
    assert re.search(r"\| funnel \| (0\.9[5-9]\d|1\.000) \|", out), out


@pytest.mark.parametrize(
    ("name", "option", "attr", "quick", "full"),
    [
        ("custom_encoder", "--epochs", "epochs", 4, 8),
        ("frozen_embeddings_adaptor", "--steps", "steps", 60, 200),
        ("funnel_search", "--n", "n", 20_000, 100_000),
    ],
)
def test_quick_sets_sizes_but_an_explicit_option_wins(name, option, attr, quick, full):
    parse = _load(name).parse_args
    assert getattr(parse(["--quick"]), attr) == quick
    assert getattr(parse([]), attr) == full
    assert getattr(parse(["--quick", option, "7"]), attr) == 7
    assert getattr(parse([option, "7", "--quick"]), attr) == 7
