"""Benchmark: nested heads, forward + backward for all prefixes, against one full-size linear head.

    .venv/bin/python benchmarks/bench_heads.py            # B=256, D=2048, C=1000, nesting 8..2048
    .venv/bin/python benchmarks/bench_heads.py --quick    # small sizes, a few seconds
    .venv/bin/python benchmarks/bench_heads.py --json results/bench_heads.json

Each method runs forward and backward (gradients w.r.t. the input and every parameter, from a fixed
random upstream gradient of the output's shape) once per round; rounds interleave the methods so
machine noise hits all of them alike; the table reports the median per method and its ratio to
the single full-size ``nn.Linear`` measured in the same run. Goal (issue 2): MRL-E fused <= 1.2x.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mrl.heads import MRLEHead, MRLHead, mrl_e_head_reference
from mrl.losses import nested_cross_entropy
from mrl.nesting import Nesting
from mrl.records import make_record, save_records


def _step_fn(forward: Callable[[], Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    """Forward + backward from a fixed upstream gradient (allocated once, outside the timing)."""
    grad = torch.randn_like(forward().detach())

    def step() -> None:
        out = forward()
        torch.autograd.grad(out, inputs, grad)

    return step


def _loss_step_fn(forward: Callable[[], Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    def step() -> None:
        torch.autograd.grad(forward(), inputs)

    return step


def build_methods(B: int, D: int, C: int, start: int, seed: int = 0) -> dict[str, Callable]:
    torch.manual_seed(seed)
    nesting = Nesting.doubling(start, D)
    z = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    linear, mrle = nn.Linear(D, C), MRLEHead(nesting, C)
    mrl, mrl_loop = MRLHead(nesting, C), MRLHead(nesting, C, fused=False)
    p_lin, p_mrle = [z, *linear.parameters()], [z, *mrle.parameters()]
    ce = nn.functional.cross_entropy
    return {
        "linear (1 full-size head)": _step_fn(lambda: linear(z), p_lin),
        "mrl-e fused": _step_fn(lambda: mrle(z), p_mrle),
        "mrl-e loop reference": _step_fn(
            lambda: mrl_e_head_reference(z, mrle.weight, nesting, mrle.bias), p_mrle),
        "mrl fused": _step_fn(lambda: mrl(z), [z, *mrl.parameters()]),
        "mrl loop reference": _step_fn(lambda: mrl_loop(z), [z, *mrl_loop.parameters()]),
        "linear + CE": _loss_step_fn(lambda: ce(linear(z), y), p_lin),
        "mrl-e fused + nested CE": _loss_step_fn(
            lambda: nested_cross_entropy(mrle(z), y), p_mrle),
    }


def run(methods: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list[float]]:
    for step in methods.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):  # interleaved: one of each per round
        for name, step in methods.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (B=32, D=256, C=100)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 15, quick 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write mrl.records here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, C, start = (32, 256, 100, 8) if args.quick else (256, 2048, 1000, 8)
    repeats = args.repeats or (10 if args.quick else 15)
    G = len(Nesting.doubling(start, D))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
          f"{platform.processor() or ''}; B={B} D={D} C={C} G={G} (doubling {start}..{D}), "
          f"float32, forward+backward, {repeats} interleaved rounds, medians")
    times = run(build_methods(B, D, C, start), repeats, warmup=2)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["linear (1 full-size head)"]
    base_ce = med["linear + CE"]
    records = []
    lines = ["| method | median ms | min ms | ratio vs linear |", "|---|---|---|---|"]
    for name, ts in times.items():
        ref = base_ce if "CE" in name else base
        ratio = med[name] / ref
        lines.append(f"| {name} | {med[name]:.2f} | {min(ts):.2f} | {ratio:.2f}x |")
        ctx = dict(B=B, D=D, C=C, G=G, repeats=repeats, torch=torch.__version__,
                   threads=torch.get_num_threads())
        records += [make_record(name, None, "ms", med[name], **ctx),
                    make_record(name, None, "ratio_vs_linear", ratio, **ctx)]
    print(f"mrl-e fused / linear = {med['mrl-e fused'] / base:.2f}x (goal <= 1.2x); "
          f"mrl-e loop / fused = {med['mrl-e loop reference'] / med['mrl-e fused']:.2f}x; "
          f"mrl loop / fused = {med['mrl loop reference'] / med['mrl fused']:.2f}x")
    print("(+ CE rows: ratio vs 'linear + CE')")
    if args.json:
        save_records(args.json, records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
