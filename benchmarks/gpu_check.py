"""The GPU checks that fit one device call, one after another, with a summary table last.

The device tool lends a GPU for 15 minutes per session (start-up included) and 10 minutes per
command, so everything that needs no vision data runs in one prepared call (carry
``[".gpu/text"]``, built by ``python benchmarks/prepare_gpu_carry.py --what text``):

1. ``train-step``: `bench_train_step.py`, ResNet-18 (D=512, nesting 8..512) on 28x28 images,
   batch 256: MRL and MRL-E step time vs the plain model (goal: MRL <= 1.05x plain);
2. ``retrieval``: `gpu_retrieval.py`, 1M x 2048 float16, the funnel vs exact full-size search
   (goal: a funnel >= 10x exact; recall@10 against float32 exact search is reported beside it);
3. ``text``: `gpu_text.py`, Matryoshka fine-tuning of all-MiniLM-L6-v2 on Cranfield
   title -> abstract pairs, evaluated on Cranfield's queries (goals: 64 dims keep >= 95% of the
   model's own full-size nDCG@10, full size not below the base model's).

Each section runs in its own process under its own timeout (a failure or time-out is reported
and the next section runs); its log and JSON records go to ``--out`` (``$OUT`` on the device, so
they come back even when the call is cut short). Exit status 1 if any section failed.

    python3 benchmarks/gpu_check.py --out "$OUT"                         # on the device
    python3 benchmarks/gpu_check.py --out /tmp/check --device cpu --smoke  # tiny CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TAIL = 30  # log lines printed after each section (the device returns the last 12,000 chars)


def sections(args: argparse.Namespace) -> dict[str, tuple[int, list[str]]]:
    """name -> (timeout s, argv). ``--smoke``: tiny sizes, to check the wiring on a CPU."""
    out, py, dev = Path(args.out), sys.executable, args.device
    step = ["--model", "resnet18", "--dim", "512", "--nesting", "doubling:8", "--batch", "256",
            "--size", "28", "--rounds", "5", "--steps", "10"]  # fmt: skip
    retrieval: list[str] = []
    text = ["--data", str(Path(args.text) / "cranfield"), "--model",
            str(Path(args.text) / "minilm-fp16")]  # fmt: skip
    if args.smoke:
        step = ["--model", "resnet18", "--dim", "16", "--nesting", "doubling:8", "--batch", "4",
                "--size", "8", "--rounds", "1", "--steps", "1"]  # fmt: skip
        retrieval = ["--n", "2000", "--dim", "64", "--queries", "16", "--repeats", "1",
                     "--shortlist", "50"]  # fmt: skip
        text += ["--epochs", "1", "--batch-size", "16", "--max-seq-length", "16"]
    slow = 5 if dev == "cpu" else 1  # a CPU wiring check (--smoke) encodes Cranfield slowly
    return {
        "train-step": (120, [py, str(BENCH / "bench_train_step.py"), *step, "--device", dev,
                             "--json", str(out / "train_step.json")]),
        "retrieval": (200, [py, str(BENCH / "gpu_retrieval.py"), *retrieval, "--device", dev,
                            "--json", str(out / "gpu_retrieval.json")]),
        "text": (200 * slow, [py, str(BENCH / "gpu_text.py"), *text, "--device", dev,
                       "--out", args.text_model_out, "--json", str(out / "gpu_text.json")]),
    }  # fmt: skip


def run_section(name: str, timeout: int, argv: list[str], out: Path) -> tuple[int, float]:
    """Run one section with its output in OUT/<name>.log (written as it runs: a call cut short
    still returns it), then print the log's last lines; (exit code, seconds), 124 on time-out."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"[{name}] {' '.join(argv[1:])} (timeout {timeout} s)", flush=True)
    t0 = time.time()
    log = out / f"{name}.log"
    with open(log, "w", encoding="utf-8") as f:
        try:
            rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    secs = time.time() - t0
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    print("\n".join(lines[-TAIL:]))
    print(f"[{name}] exit {rc} after {secs:.0f} s\n", flush=True)
    return rc, secs


def _records(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []


def summary(out: Path, status: dict[str, tuple[int, float]]) -> list[str]:
    """The table printed last: one row per section, its numbers against its goal."""
    rows = ["| check | result | goal | verdict |", "|---|---|---|---|"]
    for name, (rc, secs) in status.items():
        if rc != 0:
            why = "timed out" if rc == 124 else f"exit {rc}"
            rows.append(f"| {name} | failed ({why} after {secs:.0f} s; {name}.log) | | |")
            continue
        rows.append(f"| {name} | " + " | ".join(SUMMARIES[name](out)) + " |")
    return rows


def _train_step(out: Path) -> tuple[str, str, str]:
    ratio = {r["method"]: r["value"] for r in _records(out / "train_step.json")
             if r["metric"] == "ratio_to_plain"}
    if not {"mrl", "mrl-e"} <= set(ratio):
        return "no records", "MRL <= 1.05x plain", "?"
    result = f"MRL {ratio['mrl']:.3f}x, MRL-E {ratio['mrl-e']:.3f}x plain step time"
    return result, "MRL <= 1.05x plain", "met" if ratio["mrl"] <= 1.05 else "missed"


def _retrieval(out: Path) -> tuple[str, str, str]:
    recs = _records(out / "gpu_retrieval.json")
    speed = {(r["method"], r["prefix"]): r["value"] for r in recs
             if r["metric"] == "speedup_vs_exact" and r["method"] != "exact"}
    recall = {(r["method"], r["prefix"]): r["value"] for r in recs
              if r["metric"].startswith("recall@")}
    if not speed:
        return "no records", "funnel >= 10x exact", "?"
    best = max(speed, key=speed.get)
    result = (f"best funnel {best[0]} (D_s {best[1]}): {speed[best]:.1f}x exact, "
              f"recall {recall.get(best, float('nan')):.4f}")
    return result, "funnel >= 10x exact", "met" if speed[best] >= 10 else "missed"


def _text(out: Path) -> tuple[str, str, str]:
    ndcg = {(r["method"], r["prefix"]): r["value"] for r in _records(out / "gpu_text.json")
            if r["metric"] == "ndcg@10"}
    full = max((p for m, p in ndcg if m == "finetune"), default=None)
    if full is None or ("finetune", 64) not in ndcg or ("truncate", full) not in ndcg:
        return "no records", "64 dims >= 95% of own full; full >= base", "?"
    share = ndcg[("finetune", 64)] / ndcg[("finetune", full)]
    base = ndcg[("truncate", full)]
    result = (f"64 dims keep {100 * share:.1f}% of own full size {ndcg[('finetune', full)]:.4f}"
              f" (base {base:.4f})")
    met = share >= 0.95 and ndcg[("finetune", full)] >= base
    return result, "64 dims >= 95% of own full; full >= base", "met" if met else "missed"


SUMMARIES = {"train-step": _train_step, "retrieval": _retrieval, "text": _text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check",
                   help="logs and records (default $OUT, else runs/gpu-check)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--text", default=".gpu/text", help="the text carry (prepare_gpu_carry.py)")
    p.add_argument("--text-model-out", default="runs/gpu-check/text-ft",
                   help="fine-tuned model folder (kept between calls to a warm machine)")
    p.add_argument("--only", default=None, help="comma-separated sections (default all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the wiring on a CPU")
    args = p.parse_args(argv)
    plan = sections(args)
    chosen = list(plan) if args.only is None else [s.strip() for s in args.only.split(",")]
    unknown = [s for s in chosen if s not in plan]
    if unknown or not chosen:
        p.error(f"--only must name sections among {list(plan)}, got --only {args.only}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available to this torch "
                f"({torch.__version__}); pass --device cpu --smoke for a CPU wiring check")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {where}", flush=True)
    status = {name: run_section(name, *plan[name], out) for name in chosen}
    table = summary(out, status)
    (out / "summary.md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print(f"\n## GPU check on {where} ({sum(s for _, s in status.values()):.0f} s)\n")
    print("\n".join(table))
    return 1 if any(rc != 0 for rc, _ in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
