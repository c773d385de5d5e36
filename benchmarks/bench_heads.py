"""Benchmark: nested heads, forward + backward for all prefixes, against one full-size linear head.

    .venv/bin/python benchmarks/bench_heads.py            # B=256, D=2048, C=1000, nesting 8..2048
    .venv/bin/python benchmarks/bench_heads.py --quick    # small sizes, a few seconds
    .venv/bin/python benchmarks/bench_heads.py --json results/bench_heads.json

Each method runs forward and backward (gradients w.r.t. the input and every parameter, from a fixed
random upstream gradient of the output's shape) once per round; rounds interleave the methods so
machine noise hits all of them alike; the table reports the median per method and its ratio to
the single full-size ``nn.Linear`` measured in the same run. Goal (issue 2): MRL-E fused <= 1.2x.
Before any timing, each fast path is checked against its reference loop on the timed inputs and
weights (output and every gradient from the same upstream gradient); a mismatch stops the run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mrl.commands._options import check_minimums
from mrl.heads import MRLEHead, MRLHead, mrl_e_head_reference
from mrl.losses import (
    contrastive_loss,
    matryoshka_contrastive_loss,
    matryoshka_contrastive_loss_reference,
    nested_cross_entropy,
)
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


LINEAR, LINEAR_CE, CONTRASTIVE = "linear (1 full-size head)", "linear + CE", "contrastive, full D"


Check = tuple[str, Callable[[], Tensor], Callable[[], Tensor], list[Tensor], list[Tensor]]


def build_methods(
    B: int, D: int, C: int, start: int, seed: int = 0, checks: list[Check] | None = None
) -> dict[str, tuple[Callable, str]]:
    """name -> (step, name of the baseline its ratio is taken against). ``checks``, if given,
    receives (name, fast, reference, fast's inputs, reference's inputs) on the timed tensors."""
    torch.manual_seed(seed)
    nesting = Nesting.doubling(start, D)
    z = torch.randn(B, D, requires_grad=True)
    y = torch.randint(0, C, (B,))
    linear, mrle = nn.Linear(D, C), MRLEHead(nesting, C)
    mrl, mrl_loop = MRLHead(nesting, C), MRLHead(nesting, C, fused=False)
    mrl_loop.load_state_dict(mrl.state_dict())  # same weights: the agreement check compares them
    p_lin, p_mrle = [z, *linear.parameters()], [z, *mrle.parameters()]
    ce = nn.functional.cross_entropy
    # Contrastive: B query/positive pairs of size D, in-batch negatives.
    q, p = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    pairs: list[Check] = [
        ("mrl-e fused vs loop", lambda: mrle(z),
         lambda: mrl_e_head_reference(z, mrle.weight, nesting, mrle.bias), p_mrle, p_mrle),
        ("mrl fused vs loop", lambda: mrl(z), lambda: mrl_loop(z),
         [z, *mrl.parameters()], [z, *mrl_loop.parameters()]),
        ("matryoshka contrastive one-pass vs loop",
         lambda: matryoshka_contrastive_loss(q, p, nesting),
         lambda: matryoshka_contrastive_loss_reference(q, p, nesting), [q, p], [q, p]),
    ]
    if checks is not None:
        checks.extend(pairs)
    return {
        LINEAR: (_step_fn(lambda: linear(z), p_lin), LINEAR),
        "mrl-e fused": (_step_fn(lambda: mrle(z), p_mrle), LINEAR),
        "mrl-e loop reference": (_step_fn(
            lambda: mrl_e_head_reference(z, mrle.weight, nesting, mrle.bias), p_mrle), LINEAR),
        "mrl fused": (_step_fn(lambda: mrl(z), [z, *mrl.parameters()]), LINEAR),
        "mrl loop reference": (_step_fn(lambda: mrl_loop(z), [z, *mrl_loop.parameters()]), LINEAR),
        LINEAR_CE: (_loss_step_fn(lambda: ce(linear(z), y), p_lin), LINEAR_CE),
        "mrl-e fused + nested CE": (_loss_step_fn(
            lambda: nested_cross_entropy(mrle(z), y), p_mrle), LINEAR_CE),
        CONTRASTIVE: (_loss_step_fn(lambda: contrastive_loss(q, p), [q, p]), CONTRASTIVE),
        "matryoshka contrastive one-pass": (_loss_step_fn(
            lambda: matryoshka_contrastive_loss(q, p, nesting), [q, p]), CONTRASTIVE),
        "matryoshka contrastive loop": (_loss_step_fn(
            lambda: matryoshka_contrastive_loss_reference(q, p, nesting), [q, p]), CONTRASTIVE),
    }


def check_agreement(checks: list[Check], rtol: float = 1e-4, atol: float = 1e-4) -> list[str]:
    """Fast path == reference loop on the inputs built by `build_methods` (values and gradients
    from one upstream gradient); raises AssertionError naming the pair that differs."""
    done = []
    for name, fast, ref, p_fast, p_ref in checks:
        out_f, out_r = fast(), ref()
        gen = torch.Generator().manual_seed(1)
        upstream = torch.randn(out_f.shape, dtype=out_f.dtype, generator=gen)
        g_f = torch.autograd.grad(out_f, p_fast, upstream)
        g_r = torch.autograd.grad(out_r, p_ref, upstream)
        for what, a, b in [("output", out_f, out_r), *((f"grad {i}", a, b)
                                                       for i, (a, b) in enumerate(zip(g_f, g_r)))]:
            try:
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
            except AssertionError as err:
                raise AssertionError(f"{name}: {what} differs from the reference: {err}") from None
        done.append(name)
    return done


def run(methods: dict[str, tuple[Callable, str]], repeats: int, warmup: int
        ) -> dict[str, list[float]]:
    for step, _ in methods.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):  # interleaved: one of each per round
        for name, (step, _) in methods.items():
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
    try:  # --repeats 0 became the default without a word
        check_minimums(args, (("repeats", 1), ("threads", 1)))
    except ValueError as err:
        ap.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    B, D, C, start = (32, 256, 100, 8) if args.quick else (256, 2048, 1000, 8)
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 15)
    G = len(Nesting.doubling(start, D))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()} "
          f"{platform.processor() or ''}; B={B} D={D} C={C} G={G} (doubling {start}..{D}), "
          f"float32, forward+backward, {repeats} interleaved rounds, medians")
    checks: list[Check] = []
    methods = build_methods(B, D, C, start, checks=checks)
    checked = check_agreement(checks)  # before any timing: the timed fast paths are right
    print(f"agreement (outputs and gradients, same inputs): {'; '.join(checked)}: ok")
    times = run(methods, repeats, warmup=2)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med[LINEAR]
    records = []
    lines = ["| method | median ms | min ms | ratio vs baseline | baseline |", "|---" * 5 + "|"]
    for name, ts in times.items():
        ratio = med[name] / med[methods[name][1]]
        lines.append(f"| {name} | {med[name]:.2f} | {min(ts):.2f} | {ratio:.2f}x | "
                     f"{methods[name][1]} |")
        ctx = dict(B=B, D=D, C=C, G=G, repeats=repeats, torch=torch.__version__,
                   threads=torch.get_num_threads())
        records += [make_record(name, None, "ms", med[name], **ctx),
                    make_record(name, None, "ratio_vs_baseline", ratio,
                                baseline=methods[name][1], **ctx)]
    print(f"mrl-e fused / linear = {med['mrl-e fused'] / base:.2f}x (goal <= 1.2x); "
          f"mrl-e loop / fused = {med['mrl-e loop reference'] / med['mrl-e fused']:.2f}x; "
          f"mrl loop / fused = {med['mrl loop reference'] / med['mrl fused']:.2f}x")
    print(f"matryoshka contrastive loop / one-pass = "
          f"{med['matryoshka contrastive loop'] / med['matryoshka contrastive one-pass']:.2f}x")
    if args.json:
        save_records(args.json, records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
