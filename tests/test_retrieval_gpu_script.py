"""benchmarks/gpu_retrieval.py runs end to end on CPU (tiny sizes): its torch path is portable."""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script


def test_gpu_script_runs_on_cpu(tmp_path, capsys):
    mod = load_script("benchmarks", "gpu_retrieval")
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
            "15",
            "--shortlist-dim",
            "8",
            "--json",
            str(tmp_path / "g.json"),
        ]
    )
    by = {(r["method"], r["metric"]): r["value"] for r in recs}
    naive = by[("funnel-naive", "recall@10")]
    for b in (32, 64, 128, 256):  # block-max selection is exact: same shortlist as topk
        assert by[(f"funnel-blockmax-b{b}", "recall@10")] == naive
    assert by[("index", "recall@10")] == naive
    # "exact" is scored against the script's own truth (the same float32 product and topk), so
    # its 1.0 proves nothing: check that truth and the funnel's recall independently, in numpy
    # float64 on the same data (seed 0, clusters = n // 100 as the script draws it)
    import numpy as np
    import torch

    db, q = (x.double().numpy() for x in mod.make_data(1000, 32, 8, torch.device("cpu"),
                                                         torch.float32, clusters=10))
    full = q @ db.T  # rows are unit vectors: cosine
    truth = np.argsort(-full, axis=1)[:, :10]
    script_truth = mod.exact_truth(torch.from_numpy(q).float(), torch.from_numpy(db).float(), 10)
    np.testing.assert_array_equal(np.sort(script_truth.numpy(), axis=1), np.sort(truth, axis=1))
    assert by[("exact", "recall@10")] == 1.0
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    short = unit(q[:, :8]) @ unit(db[:, :8]).T  # D_s = 8
    cand = np.argsort(-short, axis=1)[:, :15]  # K = 15
    rerank = np.take_along_axis(full, cand, axis=1)
    found = np.take_along_axis(cand, np.argsort(-rerank, axis=1)[:, :10], axis=1)
    recall = np.mean([len(np.intersect1d(f, t)) / 10 for f, t in zip(found, truth)])
    assert 0.5 < recall < 1  # this small funnel loses some true neighbours (0.875), not most
    assert naive == pytest.approx(recall, abs=1e-12)
    out = capsys.readouterr().out
    assert "| method |" in out and "float32" in out  # --dtype float16 on the CPU ran in float32
    assert {r["dtype"] for r in recs} == {"float32"}


def test_gpu_carry_and_vision_script(tmp_path):
    """benchmarks/gpu.sh with a stand-in python: each task's table printed as it finishes,
    a failing task reported without hiding the other, only small files copied to $OUT, exit 1."""
    import os
    import subprocess

    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        '# fakepy -c PREFLIGHT DEVICE, then fakepy -m mrl.cli reproduce TASK ... --out DIR\n'
        'if [ "$1" = -c ]; then echo "preflight $3"; [ -z "$FAIL_PREFLIGHT" ]; exit; fi\n'
        'task=$4; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done\n'
        'echo "[mrl] seed 0: training ... args: $*"\n'
        'if [ "$task" = fashion-mnist-1k ]; then echo boom >&2; exit 3; fi\n'
        'mkdir -p "$out"; echo "| table |" > "$out/results.md"; echo big > "$out/big.pt"\n'
        'echo "### top1 (%)"; echo "| mrl | 90 |"\n'
    )
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    script = str(root / "benchmarks" / "gpu.sh")
    env = {**os.environ, "PY": str(fake), "RESULTS": str(tmp_path / "res")}
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    out = run.stdout
    assert "## fashion-mnist (full budget, seed 0)" in out and "| mrl | 90 |" in out
    assert "## fashion-mnist-1k FAILED (exit 3" in out and "boom" in out
    assert "failed: fashion-mnist-1k (exit 3" in out
    assert "preflight cuda" in out  # torch/CUDA checked before any task
    # a device call ($OUT set): one task, its log straight into $OUT (a killed call still
    # returns it) with the device forced, small result files copied, REPRODUCE_ARGS passed on
    env = {**env, "OUT": str(tmp_path / "out"), "TASKS": "fashion-mnist",
           "REPRODUCE_ARGS": "--only mrl,plain --set epochs=2"}
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "fashion-mnist" / "results.md").is_file()
    assert not (tmp_path / "out" / "fashion-mnist" / "big.pt").exists()
    log = (tmp_path / "out" / "fashion-mnist" / "fashion-mnist.log").read_text()
    assert "--set device=cuda --no-progress --only mrl,plain --set epochs=2" in log
    assert "timeout 540 s" in run.stdout
    # a failed task's folder may hold an earlier call's results: not copied as this call's
    stale = tmp_path / "res" / "fashion-mnist-1k" / "claims.md"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("an earlier call's claims")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    run = subprocess.run(["bash", script], env={**env, "TASKS": "fashion-mnist-1k"},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1 and (tmp_path / "out" / "fashion-mnist-1k").is_dir()
    assert not (tmp_path / "out" / "fashion-mnist-1k" / "claims.md").exists()
    # in a device call the tasks share TOTAL_TIMEOUT (two of 540 s each outlived the 600 s
    # call): the first gets what is left, a task with under 30 s left is not started
    env = {**env, "TASKS": "fashion-mnist fashion-mnist-1k", "OUT": str(tmp_path / "out3"),
           "TOTAL_TIMEOUT": "100"}
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    import re

    for task in ("fashion-mnist", "fashion-mnist-1k"):  # 100 s less the seconds already spent
        assert re.search(rf"\[{task}\] reproduce --budget full --seed 0 \(timeout (9[0-9]|100) s",
                         run.stdout), run.stdout
    run = subprocess.run(["bash", script], env={**env, "TOTAL_TIMEOUT": "20"},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1 and "## fashion-mnist not started: 20 s left" in run.stdout
    assert "failed: fashion-mnist (not started" in run.stdout
    # CUDA unusable: no task starts (no silent CPU fall-back)
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh")],
                         env={**env, "FAIL_PREFLIGHT": "1", "OUT": str(tmp_path / "out2")},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1 and "[fashion-mnist]" not in run.stdout
    assert not (tmp_path / "out2").exists()


def test_gpu_text_script_reuses_a_finished_model(tmp_path, monkeypatch, capsys):
    """A rerun on a warm device machine (after a failure in evaluation) evaluates the model the
    first call trained instead of failing on the existing --out. Encoding is stubbed: this
    checks the script's control flow, not the model."""
    import json
    import sys
    from dataclasses import asdict
    from types import SimpleNamespace

    import numpy as np

    import mrl.text.cranfield as cran
    import mrl.text.encoders as enc
    import mrl.text.evaluation as ev
    import mrl.text.finetune as ft

    out = tmp_path / "ft"
    out.mkdir()
    # the settings this call gives (the script's defaults, on the CPU)
    saved = ft.FinetuneConfig(epochs=3, batch_size=128, lr=5e-5, max_seq_length=256, seed=0,
                              device="cuda")  # trained on the device: the device may differ
    (out / "mrl.json").write_text(json.dumps({"config": asdict(saved), "base_model": "default"}))
    ds = SimpleNamespace(titles=["wing flow", "heat flux"],
                         bodies=["the wing flow was measured at low speed", "heat flux data"],
                         documents=["a b x", "c d y"], queries=["a"])  # fmt: skip
    monkeypatch.setattr(cran, "load_cranfield", lambda *a, **k: ds)
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(enc, "load_encoder", lambda *a, **k: object())
    monkeypatch.setattr(enc, "embedding_dim", lambda e: 16)
    monkeypatch.setattr(enc, "encode", lambda e, texts, **k: np.ones((len(texts), 16)))
    seen = []
    monkeypatch.setattr(ev, "evaluate_retrieval", lambda *a, method, **k: seen.append(method) or [])
    monkeypatch.setattr(ev, "relative_table", lambda recs, metric: "| table |")
    monkeypatch.setattr("mrl.records.save_records", lambda path, recs: None)
    mod = load_script("benchmarks", "gpu_text")
    monkeypatch.setattr(sys, "argv", ["gpu_text.py", "--device", "cpu", "--out", str(out)])
    mod.main()
    printed = capsys.readouterr().out
    assert "reusing the fine-tuned model" in printed and "reused from an earlier call" in printed
    assert seen == ["truncate", "finetune"] and "| table |" in printed
    # a model trained with other settings was reused and labelled with this call's: refused
    monkeypatch.setattr(sys, "argv", ["gpu_text.py", "--device", "cpu", "--out", str(out),
                                      "--epochs", "5", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match=r"other settings \(epochs: saved 3 vs now 5; lr: saved "
                                         r"5e-05 vs now 0.001\)"):
        mod.main()
