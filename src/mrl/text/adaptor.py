"""Post-hoc Matryoshka adaptor: an orthogonal map that makes frozen embeddings' prefixes useful.

Input: any frozen embeddings ``X [N, D]`` of a corpus (a local model's or an API's). Output: a
rotation ``R [D, D]`` (orthogonal), applied as ``Y = X @ R``. Because R is orthogonal, full-size
cosines (and so full-size search) are exactly unchanged; only how information is spread over the
coordinates changes, so that the prefixes ``Y[:, :m]`` keep the ranking of full-size search.

1. Start: uncentred PCA on the corpus (right singular vectors of X, by decreasing singular value).
   This is the baseline: leading coordinates carry the most energy.
2. Learn ``R = R_pca @ expm(A - A^T)`` (a rotation; A starts at 0) with a ranking-aware objective,
   using documents as pseudo-queries and never any query or label: for a pseudo-query q, its
   candidates are its K nearest full-size neighbours (self excluded) and M random documents; the
   target is ``softmax(cos_full / tau_t)`` over the candidates, and the loss at prefix m is
   ``KL(target || softmax(cos_m / tau))``, summed over prefixes with the nesting's weights.
   Matching the *distribution over neighbours*, not absolute cosines, is what keeps rankings.
   Optionally the pseudo-queries are sample queries ``Q [Nq, D]`` instead (e.g. the titles a
   model was fine-tuned on, or a log of real queries): each one's candidates are its K nearest
   documents and M random documents. Still no relevance judgment: the target is full-size search.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrl.arrays import as_numpy
from mrl.config import check_types
from mrl.io import atomic_open, atomic_torch_save, atomic_write_json
from mrl.nesting import Nesting

__all__ = [
    "AdaptorConfig",
    "OrthogonalAdaptor",
    "pca_rotation",
    "prefix_cosine",
    "prefix_cosine_rows",
    "listwise_prefix_loss",
    "full_neighbours",
    "query_neighbours",
    "sample_candidates",
    "dense_rotation_module",
]


@dataclass
class AdaptorConfig:
    """Settings of `OrthogonalAdaptor.fit`.

    Attributes:
        nesting: prefix spec ("8,16,...", "doubling:8"); None = doubling from 8 to D.
        init: "pca" (uncentred PCA rotation of the corpus) or "identity".
        steps: optimisation steps (0 = the initial rotation only).
        batch_size: pseudo-queries (corpus documents) per step.
        neighbours: K full-size nearest neighbours per pseudo-query (the list whose order is kept).
        random_negatives: M random documents per step added to every candidate list.
        temperature: softmax temperature of prefix cosines (student).
        target_temperature: softmax temperature of full-size cosines (target).
        lr: Adam learning rate on the skew-symmetric generator.
        seed: sampling seed.
    """

    nesting: str | None = None
    init: str = "pca"
    steps: int = 300
    batch_size: int = 256
    neighbours: int = 32
    random_negatives: int = 256
    temperature: float = 0.05
    target_temperature: float = 0.05
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "")  # steps=2.5 or lr=inf failed deep in torch, or not at all
        if self.init not in ("pca", "identity"):
            raise ValueError(f"init must be 'pca' or 'identity', got {self.init!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.random_negatives < 0:
            raise ValueError(f"random_negatives must be >= 0, got {self.random_negatives}")
        for name in ("temperature", "target_temperature", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _check_corpus(x: Any, name: str = "embeddings", min_rows: int = 2) -> torch.Tensor:
    arr = as_numpy(x)
    if np.iscomplexobj(arr):  # the float32 cast would drop the imaginary part with a warning
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    t = torch.as_tensor(arr, dtype=torch.float32)  # tensors: detached, on the CPU
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} rows, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contain NaN or inf")
    return t


def _check_directions(t: torch.Tensor, name: str) -> None:
    """Rows to fit on need a direction: all-zero rows are refused, some are named."""
    zero = len(t) - int((t != 0).any(1).sum())
    if zero == len(t):  # no direction to keep: any rotation would "fit" with loss 0
        raise ValueError(f"{name}: every row is all zeros; nothing to fit")
    if zero:  # cosine is undefined for them: they rank arbitrarily
        warnings.warn(f"{name}: {zero} of {len(t)} rows are all zeros (no direction; check "
                      "the encoder's output)", stacklevel=3)


def _check_queries(queries: Any, dim: int) -> torch.Tensor:
    q = _check_corpus(queries, "queries", min_rows=1)  # 2-D, >= 1 row, finite
    if q.shape[1] != dim:
        raise ValueError(f"queries must be [Nq, {dim}] with Nq >= 1, got shape {tuple(q.shape)}")
    return q


def pca_rotation(x: torch.Tensor) -> torch.Tensor:
    """Uncentred PCA basis ``[D, D]`` of ``x [N, D]``: column i is the i-th direction.

    Uncentred (no mean removed) so that the map is a rotation and cosines are preserved
    (`mrl.baselines.PCA`, deterministic signs).
    """
    from mrl.baselines import PCA

    return PCA(centered=False).fit(x).components_.T.float().contiguous()


def prefix_cosine(q: torch.Tensor, c: torch.Tensor, nesting: Nesting) -> torch.Tensor:
    """Cosine at every prefix ``[G, B, K]``; queries ``q [B, D]``, candidates ``c [B, K, D]``.

    A plain loop over prefixes (G is small): each prefix is re-normalised before the dot product.
    """
    out = []
    for m in nesting.sizes:
        qm = F.normalize(q[:, :m], dim=-1)  # [B, m]
        cm = F.normalize(c[..., :m], dim=-1)  # [B, K, m]
        out.append(torch.einsum("bm,bkm->bk", qm, cm))
    return torch.stack(out)  # [G, B, K]


def prefix_cosine_rows(
    y: torch.Tensor, q_pos: torch.Tensor, cand_pos: torch.Tensor, nesting: Nesting
) -> torch.Tensor:
    """`prefix_cosine` ``[G, B, K]`` for rows of one matrix ``y [U, D]``, without copying rows.

    ``q_pos [B]`` and ``cand_pos [B, K]`` index rows of y. Per prefix: one ``[B, m] x [m, U]``
    product against every row, then a gather; this avoids materialising ``[B, K, D]``, which is
    what makes `prefix_cosine` (the reference) slow for large B * K.
    """
    out = []
    for m in nesting.sizes:
        ym = F.normalize(y[:, :m], dim=-1)  # [U, m]
        scores = ym[q_pos] @ ym.T  # [B, U]
        out.append(scores.gather(1, cand_pos))  # [B, K]
    return torch.stack(out)  # [G, B, K]


def listwise_prefix_loss(
    full: torch.Tensor,
    prefix: torch.Tensor,
    nesting: Nesting,
    temperature: float,
    target_temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_g w_g mean_b KL(softmax(full_b / tau_t) || softmax(prefix_gb / tau))``.

    Args:
        full: full-size cosines ``[B, K]`` (the target ranking).
        prefix: prefix cosines ``[G, B, K]``.
        mask: ``[B, K]`` True where a candidate is invalid (e.g. the pseudo-query itself).
    """
    if mask is not None:
        full = full.masked_fill(mask, float("-inf"))
        prefix = prefix.masked_fill(mask, float("-inf"))
    target = F.softmax(full / target_temperature, dim=-1)  # [B, K]
    log_target = F.log_softmax(full / target_temperature, dim=-1)
    log_student = F.log_softmax(prefix / temperature, dim=-1)  # [G, B, K]
    # Where target is 0 (masked), the term is 0; avoid 0 * -inf = nan.
    terms = torch.where(
        target > 0, target * (log_target - log_student), torch.zeros_like(log_student)
    )
    kl = terms.sum(-1).mean(-1)  # [G]
    w = torch.tensor(nesting.weights, dtype=kl.dtype, device=kl.device)
    return (w * kl).sum()


def full_neighbours(x: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's k nearest rows by full-size cosine, itself excluded."""
    n = x.shape[0]
    if k >= n:
        raise ValueError(f"neighbours must be < number of documents ({n}), got {k}")
    return _nearest(x, x, k, block, exclude_self=True)


def query_neighbours(
    queries: torch.Tensor, docs: torch.Tensor, k: int, block: int = 1024
) -> torch.Tensor:
    """Indices ``[Nq, k]`` into ``docs [N, D]`` of each query's k nearest documents (cosine)."""
    if k > docs.shape[0]:
        raise ValueError(f"neighbours must be <= number of documents ({docs.shape[0]}), got {k}")
    return _nearest(queries, docs, k, block, exclude_self=False)


def _nearest(
    queries: torch.Tensor, docs: torch.Tensor, k: int, block: int, exclude_self: bool
) -> torch.Tensor:
    """Top-k cosine indices ``[Nq, k]``, ``block`` queries at a time; ``exclude_self``: queries
    are ``docs`` itself and row i skips column i."""
    dn = F.normalize(docs, dim=-1)
    qn = dn if exclude_self else F.normalize(queries, dim=-1)
    out = []
    for s in range(0, qn.shape[0], block):
        sims = qn[s : s + block] @ dn.T  # [b, N]
        if exclude_self:
            rows = torch.arange(s, s + len(sims))
            sims[torch.arange(len(sims)), rows] = float("-inf")
        out.append(sims.topk(k, dim=-1).indices)
    return torch.cat(out)


def sample_candidates(
    nbrs: torch.Tensor,
    batch_size: int,
    random_negatives: int,
    gen: torch.Generator,
    n_docs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's pseudo-queries and candidates, drawn from ``gen``.

    ``nbrs [N, K]``: each document's full-size neighbours (`full_neighbours`). Returns
    ``q [B]`` (B = min(batch_size, N) random documents), ``cand [B, K + M]`` (their neighbours
    plus M = ``random_negatives`` random documents shared by the batch), ``rows [U]`` (the
    distinct documents involved: transform each once, not B * (K + M) rows) and
    ``inv [B, 1 + K + M]`` (positions in ``rows`` of each query, column 0, and its candidates).

    ``n_docs``: sample queries mode: ``nbrs [Nq, K]`` are queries' neighbours among ``n_docs``
    documents (`query_neighbours`), random negatives are documents, and query i is row
    ``n_docs + i`` of the stacked ``[documents; queries]`` matrix (``q`` holds those rows).
    """
    n = nbrs.shape[0]
    # drawn by ``gen`` (a CPU generator: the same draws on any device), then on nbrs' device
    q = torch.randint(n, (min(batch_size, n),), generator=gen).to(nbrs.device)  # [B]
    cand = nbrs[q]  # [B, K]
    if random_negatives:
        rnd = torch.randint(n if n_docs is None else n_docs, (random_negatives,), generator=gen)
        rnd = rnd.to(nbrs.device)
        cand = torch.cat([cand, rnd.expand(len(q), -1)], dim=1)  # [B, K + M]
    if n_docs is not None:
        q = q + n_docs  # rows after the documents
    rows, inv = torch.unique(torch.cat([q[:, None], cand], 1), return_inverse=True)
    return q, cand, rows, inv


def check_orthogonal(r: torch.Tensor) -> float:
    """ValueError unless the square ``r [D, D]`` is orthogonal within 1e-3 (R^T R = I: full-size
    cosines unchanged); NaN fails too (a NaN rotation turned everything into NaN). Returns
    max |R^T R - I|."""
    err = (r.T.double() @ r.double() - torch.eye(r.shape[0], dtype=torch.float64)).abs().max()
    if not err <= 1e-3:
        raise ValueError(f"rotation must be orthogonal, got max |R^T R - I| = {err:.3g}")
    return float(err)


class OrthogonalAdaptor:
    """``y = x @ rotation``; ``rotation [D, D]`` orthogonal; prefixes of y follow the nesting."""

    def __init__(
        self,
        rotation: torch.Tensor | np.ndarray,
        nesting: Nesting | Sequence[int] | str,
        info: dict | None = None,
    ):
        nesting = Nesting.coerce(nesting)
        r = torch.as_tensor(as_numpy(rotation), dtype=torch.float32)
        if r.dim() != 2 or r.shape[0] != r.shape[1]:
            raise ValueError(f"rotation must be square [D, D], got shape {tuple(r.shape)}")
        if check_orthogonal(r) > 1e-6:  # e.g. a float16 copy (1.2e-4): full-size neighbours
            r = _reorthogonalise(r)  # moved for 9 of 2000 rows; the nearest rotation keeps them
        nesting.check_dim(r.shape[0], "the rotation's")
        self.rotation = r
        self.nesting = nesting
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        return self.rotation.shape[0]

    def transform(self, x: Any) -> np.ndarray:
        """``[N, D] -> [N, D]`` float32 (numpy in, numpy out)."""
        t = _check_corpus(x, "x", min_rows=0)  # finite whatever the row count (one row too)
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ValueError(f"x must be [N, {self.dim}], got shape {tuple(t.shape)}")
        return (t @ self.rotation).numpy()

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        corpus: Any,
        config: AdaptorConfig | None = None,
        log: Callable[[str], None] | None = None,
        queries: Any = None,
    ) -> OrthogonalAdaptor:
        """Learn the rotation on corpus embeddings ``[N, D]`` (no relevance judgments, no labels).

        ``queries [Nq, D]``: sample queries as the pseudo-queries (default: the documents).
        """
        config = config or AdaptorConfig()
        x = _check_corpus(corpus, "corpus")
        _check_directions(x, "corpus")
        n, d = x.shape
        qx = None if queries is None else _check_queries(queries, d)
        nesting = (
            Nesting.doubling(8, d)
            if config.nesting is None
            else Nesting.parse(config.nesting, dim=d)
        )
        nesting.check_dim(d, "corpus embeddings")
        base = pca_rotation(x) if config.init == "pca" else torch.eye(d)
        info = {"config": asdict(config), "corpus_size": n,
                "pseudo_queries": "documents" if qx is None else len(qx)}  # fmt: skip
        if config.steps == 0:
            return cls(base, nesting, {**info, "final_loss": None})
        gen = torch.Generator().manual_seed(config.seed)
        most = n - 1 if qx is None else n  # a document is not its own neighbour
        if config.neighbours > most:
            warnings.warn(f"neighbours={config.neighbours} is more than the corpus offers "
                          f"({most} per pseudo-query); using {most}", stacklevel=2)
        if qx is None:
            nbrs, n_docs = full_neighbours(x, min(config.neighbours, n - 1)), None  # [N, K]
        else:  # stack [documents; queries]: query i is row n + i
            nbrs, n_docs = query_neighbours(qx, x, min(config.neighbours, n)), n  # [Nq, K]
            x = torch.cat([x, qx])
        xn = F.normalize(x, dim=-1)  # full-size cosines are dot products of these
        skew = torch.zeros(d, d, requires_grad=True)
        opt = torch.optim.Adam([skew], lr=config.lr)
        t0, loss_value = time.time(), float("nan")
        for step in range(config.steps):
            q_idx, cand, rows, inv = sample_candidates(
                nbrs, config.batch_size, config.random_negatives, gen, n_docs
            )  # [B], [B, K + M], [U], [B, 1 + K + M]
            mask = cand == q_idx[:, None]  # a random pick may be the pseudo-query itself
            full = torch.einsum("bd,bkd->bk", xn[q_idx], xn[cand])  # [B, K + M]
            rot = base @ torch.linalg.matrix_exp(skew - skew.T)  # [D, D], orthogonal
            y = x[rows] @ rot  # [U, D]: each needed row rotated once
            pre = prefix_cosine_rows(y, inv[:, 0], inv[:, 1:], nesting)  # [G, B, K + M]
            loss = listwise_prefix_loss(
                full, pre, nesting, config.temperature, config.target_temperature, mask
            )
            loss_value = loss.item()
            if not np.isfinite(loss_value):  # was noticed after every step, as an SVD error
                raise ValueError(f"the adaptor's loss is {loss_value} at step {step + 1}: "
                                 f"temperature={config.temperature} / target_temperature="
                                 f"{config.target_temperature} are too small for float32")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (step % 50 == 0 or step == config.steps - 1):
                secs = time.time() - t0
                log(f"adapt step {step + 1}/{config.steps} loss {loss_value:.4f} ({secs:.0f}s)")
        with torch.no_grad():
            rot = base @ torch.linalg.matrix_exp((skew - skew.T).double()).float()
            rot = _reorthogonalise(rot)
        return cls(rot, nesting, {**info, "final_loss": loss_value})

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> None:
        """``path`` (.pt: rotation, nesting, info) plus a sibling .npy of the rotation and a .json
        of the nesting and info."""
        path = Path(path)
        if path.suffix in (".npy", ".json"):  # the sibling of that name overwrote the .pt file
            raise ValueError(f"adaptor path {str(path)!r} must not end in {path.suffix} (the "
                             "siblings .npy and .json are written beside it): use a .pt name")
        atomic_torch_save(
            {"rotation": self.rotation, "nesting": self.nesting.to_dict(), "info": self.info}, path
        )
        with atomic_open(path.with_suffix(".npy"), "wb") as f:
            np.save(f, self.rotation.numpy())
        atomic_write_json(
            path.with_suffix(".json"), {"nesting": self.nesting.to_dict(), **self.info}
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> OrthogonalAdaptor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"adaptor file {str(path)!r} does not exist")
        if path.suffix not in (".pt", ".npy"):  # a .json or embeddings gave torch's unpickling
            raise ValueError(f"adaptor file {str(path)!r} must be the .pt or .npy that "
                             "`OrthogonalAdaptor.save` / `mrl text adapt` writes")
        try:
            return cls._load(path)
        except (KeyError, TypeError, AttributeError, IndexError, pickle.UnpicklingError,
                RuntimeError) as exc:  # a foreign file: not a bare KeyError 'rotation'
            raise ValueError(f"{str(path)!r} is not an adaptor written by mrl "
                             f"({type(exc).__name__}: {exc})") from None

    @classmethod
    def _load(cls, path: Path) -> OrthogonalAdaptor:
        if path.suffix == ".npy":
            rot = np.load(path, allow_pickle=False)
            if rot.ndim != 2 or rot.shape[0] != rot.shape[1]:  # before a default nesting
                raise ValueError(f"{str(path)!r} holds an array of shape {rot.shape}, not a "
                                 "square rotation [D, D]")
            meta = path.with_suffix(".json")
            if not meta.is_file():
                d = rot.shape[0]
                return cls(rot, Nesting.doubling(8, d) if d >= 8 else Nesting.full(d))
            data = json.loads(meta.read_text())  # {"nesting": ..., **info}, as `save` writes
            nesting = Nesting.from_dict(data.pop("nesting"))
            return cls(rot, nesting, data or None)
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["rotation"], Nesting.from_dict(data["nesting"]), data.get("info"))

    def to_sentence_transformer(
        self, base_model: str | os.PathLike, out: str | os.PathLike
    ) -> Path:
        """Save ``base_model`` + a last `Dense` module (weight = R^T, no bias, identity activation).

        Loadable by plain sentence-transformers (no mrl needed): ``SentenceTransformer(out,
        truncate_dim=m)``. The nesting is recorded in ``mrl.json``.
        """
        from mrl.io import atomic_output_dir, check_new_output_dir
        from mrl.text.encoders import embedding_dim, load_encoder, write_model_nesting

        encoder = load_encoder(base_model)
        if embedding_dim(encoder) != self.dim:
            raise ValueError(
                f"base_model embeds in {embedding_dim(encoder)} dims; the adaptor needs {self.dim}"
            )
        out = check_new_output_dir(out, "out")  # never over an existing model folder
        dense = dense_rotation_module(self.rotation)
        encoder.append(dense)
        with atomic_output_dir(out) as tmp:
            encoder.save(str(tmp), create_model_card=False)
            write_model_nesting(
                tmp, self.nesting, kind="adapt", base_model=str(base_model), **self.info
            )
        return out


def _reorthogonalise(r: torch.Tensor) -> torch.Tensor:
    """Nearest orthogonal matrix (polar factor via SVD) to clean float error."""
    u, _, vh = torch.linalg.svd(r.double())
    return (u @ vh).float()


def dense_rotation_module(rotation: torch.Tensor) -> Any:
    """A sentence-transformers `Dense` D -> D computing ``x @ rotation`` (no bias, identity)."""
    from mrl._optional import require

    require("sentence_transformers", "text")
    try:
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Dense
    d = rotation.shape[0]
    # Dense computes act(x @ W^T + b); W = R^T gives x @ R.
    return Dense(
        d,
        d,
        bias=False,
        activation_function=torch.nn.Identity(),
        init_weight=rotation.T.contiguous(),
    )
