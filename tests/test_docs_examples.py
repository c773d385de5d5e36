"""The Python examples of the docs that define their own inputs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), re.S)


@pytest.mark.parametrize("name", ["core-eval.md"])
def test_self_contained_examples_run(name, capsys):
    blocks = _blocks(name)
    assert len(blocks) >= 2
    namespace: dict = {}
    for code in blocks[:2]:  # scoring and evaluation (the report example writes files)
        exec(compile(code, f"{name} example", "exec"), namespace)
    assert namespace["scores"].shape == (7, 100, 10)
    assert "| mrl | 1nn |" in capsys.readouterr().out
    assert {r["metric"] for r in namespace["recs"]} >= {"ndcg@10", "mrr"}
