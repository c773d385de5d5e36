"""benchmarks/gpu_check.py: the GPU checks of one device call and the summary table it prints
last. Run here with tiny sizes on the CPU (the wiring), and its verdicts on given records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script


def _module():
    return load_script("benchmarks", "gpu_check")


def _write(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records))


def _rec(method, prefix, metric, value):
    return {"method": method, "prefix": prefix, "metric": metric, "value": value}


def test_summary_verdicts_follow_the_goals(tmp_path):
    mod = _module()
    _write(tmp_path / "train_step.json", [_rec("plain", None, "ratio_to_plain", 1.0),
                                          _rec("mrl", None, "ratio_to_plain", 1.04),
                                          _rec("mrl-e", None, "ratio_to_plain", 1.2)])
    _write(tmp_path / "gpu_retrieval.json", [
        _rec("exact", 2048, "speedup_vs_exact", 1.0), _rec("exact", 2048, "recall@10", 1.0),
        _rec("funnel-naive", 16, "speedup_vs_exact", 1.4),
        _rec("funnel-naive", 16, "recall@10", 0.99),
        _rec("funnel-blockmax-b64", 16, "speedup_vs_exact", 12.5),
        _rec("funnel-blockmax-b64", 16, "recall@10", 0.991)])  # fmt: skip
    text = [_rec("truncate", 384, "ndcg@10", 0.37), _rec("finetune", 384, "ndcg@10", 0.40),
            _rec("finetune", 64, "ndcg@10", 0.379)]  # 94.75%: missed
    _write(tmp_path / "gpu_text.json", text)
    rows = mod.summary(tmp_path, {"train-step": (0, 30), "retrieval": (0, 90), "text": (0, 100)})
    assert rows[2] == ("| train-step | MRL 1.040x, MRL-E 1.200x plain step time | "
                       "MRL <= 1.05x plain | met |")
    assert rows[3] == ("| retrieval | best funnel funnel-blockmax-b64 (D_s 16): 12.5x exact, "
                       "recall 0.9910 | funnel >= 10x exact | met |")
    assert rows[4].startswith("| text | 64 dims keep 94.8% of own full size 0.4000 (base 0.3700)")
    assert rows[4].endswith("| missed |")
    _write(tmp_path / "gpu_text.json", text[:2] + [_rec("finetune", 64, "ndcg@10", 0.39)])
    assert mod.summary(tmp_path, {"text": (0, 1)})[2].endswith("| met |")
    _write(tmp_path / "gpu_text.json", [_rec("truncate", 384, "ndcg@10", 0.41), *text[1:2],
                                        _rec("finetune", 64, "ndcg@10", 0.39)])
    assert mod.summary(tmp_path, {"text": (0, 1)})[2].endswith("| missed |")  # full < base
    rows = mod.summary(tmp_path, {"retrieval": (124, 200), "train-step": (1, 3)})
    assert rows[2] == "| retrieval | failed (timed out after 200 s; retrieval.log) | | |"
    assert rows[3] == "| train-step | failed (exit 1 after 3 s; train-step.log) | | |"
    (tmp_path / "train_step.json").unlink()  # exit 0 without records: not a pass
    assert mod.summary(tmp_path, {"train-step": (0, 3)})[2].endswith("| no records | "
                                                                      "MRL <= 1.05x plain | ? |")


def test_bad_options_are_named(capsys):
    mod = _module()
    with pytest.raises(SystemExit):
        mod.main(["--only", "train-step,vision", "--device", "cpu"])
    assert "--only must name sections among ['train-step', 'retrieval', 'text']" in (
        capsys.readouterr().err)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            mod.main(["--device", "cuda"])
        assert "pass --device cpu --smoke" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_on_the_cpu(tmp_path, capsys):
    """The train-step and retrieval sections end to end at tiny sizes; the table comes last."""
    rc = _module().main(["--out", str(tmp_path), "--device", "cpu", "--smoke",
                         "--only", "train-step,retrieval"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out[out.index("## GPU check on cpu"):]
    assert "| train-step | MRL " in table and "| retrieval | best funnel " in table
    assert (tmp_path / "summary.md").read_text().splitlines() == table.strip().splitlines()[2:]
    assert (tmp_path / "train-step.log").is_file() and (tmp_path / "gpu_retrieval.json").is_file()
