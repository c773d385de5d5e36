"""Training-step time of the nested heads: MRL / MRL-E vs a plain model on the same encoder.

One step = forward, nested cross-entropy, backward, optimizer step, on a fixed batch already on the
device, set up as `mrl train` sets it up (on CUDA: bfloat16 autocast, channels_last for ResNets,
cuDNN autotuning). Modes are timed in interleaved rounds (so a busy machine slows all of them
alike) and the median per mode is reported; the ratio to plain is printed last. Goal: MRL <= 1.05x
plain.

    python benchmarks/bench_train_step.py                      # small CNN, 28x28, CPU
    python benchmarks/bench_train_step.py --model resnet18 --dim 512 \
        --nesting doubling:8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mrl.commands._options import check_minimums
from mrl.config import load_config
from mrl.losses import nested_cross_entropy
from mrl.train import _memory_format, build_model, build_optimizer


def make_step(mode: str, args: argparse.Namespace, device: torch.device):
    sets = [f"model.name={args.model}", f"model.dim={args.dim}", f"model.mode={mode}",
            f"model.nesting={args.nesting}", f"batch_size={args.batch}"]  # fmt: skip
    config = load_config(None, sets)
    shape = (args.size, args.size)  # the mlp encoder's first layer is sized by it
    layout = _memory_format(config, device)  # channels_last for ResNets on CUDA, as in training
    model = build_model(config, 1, args.classes, (0.5,), (0.3,), shape).to(
        device, memory_format=layout)
    opt = build_optimizer(config, model)
    weights = config.model.get_nesting() if mode != "plain" else None
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 1, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    x, y = x.to(device, memory_format=layout), y.to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step() -> None:
        if amp is not None:
            with amp:
                _, logits = model(x)
        else:
            _, logits = model(x)
        loss = nested_cross_entropy(logits.float(), y, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--nesting", default="doubling:2",
                   help="model.nesting (default doubling:2: 2, 4, ..., --dim)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the table as records to PATH")
    args = p.parse_args(argv)
    try:  # --rounds 0: no median; --steps 0: a division by zero; --batch 1: no BatchNorm stats
        check_minimums(args, (("dim", 2), ("batch", 2), ("size", 1), ("classes", 2),
                              ("rounds", 1), ("steps", 1)))
    except ValueError as err:
        p.error(str(err))
    device = torch.device(args.device)
    if device.type == "cuda":  # as mrl.train: fixed shapes, let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    modes = ("plain", "mrl", "mrl-e")
    steps = {m: make_step(m, args, device) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for m in modes:  # warm-up
        for _ in range(2):
            steps[m]()
    for _ in range(args.rounds):
        for m in modes:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[m]()
            sync()
            times[m].append((time.perf_counter() - t0) / args.steps)
    print(
        f"# {args.model} D={args.dim} nesting={args.nesting} batch={args.batch} "
        f"{args.size}x{args.size} on {device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); median of {args.rounds} rounds x {args.steps} steps"
    )
    med = {m: statistics.median(times[m]) for m in modes}
    print("| mode | ms/step | ratio to plain |")
    print("|---|---|---|")
    for m in modes:
        print(f"| {m} | {1000 * med[m]:.1f} | {med[m] / med['plain']:.3f} |")
    if args.json:
        _save(args, device, med)
    return med


def _save(args: argparse.Namespace, device: torch.device, med: dict[str, float]) -> None:
    from mrl.records import make_record, save_records

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    context = dict(model=args.model, dim=args.dim, nesting=args.nesting, batch=args.batch,
                   size=args.size, rounds=args.rounds, steps=args.steps, device=where,
                   torch=torch.__version__)  # fmt: skip
    records = []
    for m in med:
        records.append(make_record(m, None, "ms_per_step", 1000 * med[m], **context))
        records.append(make_record(m, None, "ratio_to_plain", med[m] / med["plain"], **context))
    save_records(args.json, records)


if __name__ == "__main__":
    main()
