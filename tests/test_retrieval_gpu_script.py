"""benchmarks/gpu_retrieval.py runs end to end on CPU (tiny sizes): its torch path is portable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_retrieval.py"


def test_gpu_script_runs_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_retrieval", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recs = mod.main(
        [
            "--device",
            "cpu",
            "--n",
            "1000",
            "--dim",
            "32",
            "--queries",
            "8",
            "--repeats",
            "1",
            "--shortlist",
            "50",
            "--json",
            str(tmp_path / "g.json"),
        ]
    )
    by = {(r["method"], r["metric"]): r["value"] for r in recs}
    naive = by[("funnel-naive", "recall@10")]
    for b in (32, 64, 128, 256):  # block-max selection is exact: same shortlist as topk
        assert by[(f"funnel-blockmax-b{b}", "recall@10")] == naive
    assert by[("index", "recall@10")] == naive
    assert "| method |" in capsys.readouterr().out
