"""The CPU benchmarks run at tiny sizes, check what they time, and refuse options that gave no
timing or a foreign error. (Their speed is not tested here: ratios belong to the benchmarks.)"""

from __future__ import annotations

import pytest
import torch
from scripts import load_script


def _load(name: str):
    return load_script("benchmarks", name)


TINY_SCORES = ["--queries", "16", "--items", "300", "--dim", "32", "--repeats", "1"]


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_bench_scores_checks_the_loop_it_times(monkeypatch, metric):
    """The agreement check built its own reference and never called the timed `loop`: a loop
    that always ranked by the first 8 dims passed as 'ok'."""
    bench = _load("bench_scores")
    result = bench.main([*TINY_SCORES, "--metric", metric])
    assert set(result["median_s"]) == {"full", "all-prefix", "loop"}
    right = bench.loop

    def first_8_dims(q, x, nesting, k, metric="cosine"):
        return [right(q[:, :8], x[:, :8], type(nesting)((8,)), k, metric)[0]] * len(nesting)

    monkeypatch.setattr(bench, "loop", first_8_dims)
    with pytest.raises(AssertionError, match="prefix 16: loop items disagree"):
        bench.main([*TINY_SCORES, "--metric", metric])


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0"], "--repeats must be >= 1, got --repeats 0"),  # became the default
    (["--k", "400"], "--k must be <= --items (300), got --k 400"),  # torch's error
    (["--k", "0"], "--k must be >= 1, got --k 0"),
])  # fmt: skip
def test_bench_scores_refuses_bad_options(capsys, argv, message):
    bench = _load("bench_scores")
    with pytest.raises(SystemExit):
        bench.main([*TINY_SCORES, *argv])
    assert message in capsys.readouterr().err


def test_bench_train_step_runs_the_mlp_and_checks_options(capsys):
    """--model mlp failed (no image shape for its first layer); a --dim other than 256 failed on
    the fixed default nesting; --rounds 0 / --steps 0 ended in StatisticsError / ZeroDivision."""
    torch.manual_seed(0)
    bench = _load("bench_train_step")
    med = bench.main(["--model", "mlp", "--dim", "24", "--batch", "4", "--size", "6",
                      "--rounds", "1", "--steps", "1", "--device", "cpu"])
    assert set(med) == {"plain", "mrl", "mrl-e"} and all(v > 0 for v in med.values())
    assert "nesting=doubling:2" in capsys.readouterr().out
    for argv, message in ((["--rounds", "0"], "--rounds must be >= 1, got --rounds 0"),
                          (["--steps", "0"], "--steps must be >= 1"),
                          (["--batch", "1"], "--batch must be >= 2, got --batch 1")):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--device", "cpu"])
        assert message in capsys.readouterr().err


def test_bench_heads_refuses_zero_repeats(capsys):
    bench = _load("bench_heads")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--repeats", "0"])  # it ran the default 10 rounds
    assert "--repeats must be >= 1, got --repeats 0" in capsys.readouterr().err
