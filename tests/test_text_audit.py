"""Text-side correctness audit: title handling of documents and pairs, the embedding cache's key,
and the Cranfield loader against an independent parse of the shared copy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mrl.text.beir import load_beir_documents
from mrl.text.corpus import join_title, repeats_title
from mrl.text.encoders import encode_cached
from mrl.text.pairs import pairs_from_titles


# ---------------------------------------------------------------- titles: whole words only
def test_a_title_that_only_starts_the_first_word_is_not_a_repeat():
    body = "Wingtip vortices behind large aircraft."
    assert join_title("Wing", body) == "Wing\n" + body  # the title was dropped
    assert not repeats_title("Wing", body)
    # whole-word repeats are still recognised, whatever follows the title
    assert join_title("Wing", "Wing lift at low speed") == "Wing lift at low speed"
    assert join_title("Wing", "Wing, lift at low speed") == "Wing, lift at low speed"
    assert join_title("Wing", "Wing") == "Wing"
    assert join_title("lift .", "lift .and more") == "lift .and more"  # title ends in punctuation
    assert join_title("Wing", "Wings") == "Wing\nWings"


def test_pairs_keep_a_body_whose_first_word_only_starts_with_the_title():
    pairs = pairs_from_titles(
        ["Wing", "Wing lift", "", "title only"],
        ["Wingtip vortices behind large aircraft.", "Wing lift at low speed in a tunnel", "a b c d",
         ""],
    )  # fmt: skip
    # the body was cut to "tip vortices behind large aircraft."
    assert [(p.query, p.positive) for p in pairs] == [
        ("Wing", "Wingtip vortices behind large aircraft."),
        ("Wing lift", "at low speed in a tunnel"),
    ]


def test_beir_documents_and_embed_title_text_join_titles_alike(tmp_path):
    """`mrl embed --field title+text` encodes a BEIR document as `mrl eval` does."""
    from mrl.embed import read_corpus

    rows = [{"_id": "d1", "title": "Wing", "text": "Wingtip vortices behind aircraft."},
            {"_id": "d2", "title": "Wing lift", "text": "Wing lift at low speed."},
            {"_id": "d3", "title": None, "text": "Heat flow in slabs."},
            {"_id": "d4", "title": "Shock waves", "text": " "}]  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_beir_documents(tmp_path)
    assert ds.documents == ["Wing\nWingtip vortices behind aircraft.", "Wing lift at low speed.",
                            "Heat flow in slabs.", "Shock waves"]  # fmt: skip
    embedded = list(read_corpus(tmp_path / "corpus.jsonl", "title+text", "_id"))
    assert embedded == list(zip(ds.doc_ids, ds.documents))


# ---------------------------------------------------------------- the embedding cache's key
class _CountingEncoder:
    """Stands in for a SentenceTransformer: counts the texts it encodes."""

    max_seq_length = None

    def __init__(self):
        self.calls = 0

    def encode(self, texts, **kwargs):
        self.calls += 1
        return np.full((len(texts), 4), float(self.calls), dtype=np.float32)


def _model_folder(root):
    """A sentence-transformers folder's layout: top-level weights and a Dense module folder."""
    root.mkdir()
    modules = [{"idx": 0, "name": "0", "path": "", "type": "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Dense", "type": "Dense"}]  # fmt: skip
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "model.safetensors").write_bytes(b"transformer weights")
    (root / "1_Dense").mkdir()
    (root / "1_Dense" / "model.safetensors").write_bytes(b"dense weights A")
    return root


def test_cache_misses_when_a_module_folder_is_rewritten_in_place(tmp_path):
    model, cache = _model_folder(tmp_path / "model"), tmp_path / "cache"
    enc = _CountingEncoder()
    texts = ["wing lift", "heat flow"]
    first = encode_cached(model, texts, cache, encoder=enc)
    assert enc.calls == 1
    np.testing.assert_array_equal(encode_cached(model, texts, cache, encoder=enc), first)
    assert enc.calls == 1  # a hit
    # another rotation in the Dense layer (same size): other embeddings, not the cached ones
    (model / "1_Dense" / "model.safetensors").write_bytes(b"dense weights B")
    second = encode_cached(model, texts, cache, encoder=enc)
    assert enc.calls == 2 and not np.array_equal(second, first)
    # a module's config too (e.g. pooling mode or a max_seq_length edited in place)
    (model / "sentence_bert_config.json").write_text('{"max_seq_length": 8}')
    encode_cached(model, texts, cache, encoder=enc)
    assert enc.calls == 3


def test_cache_still_hits_when_a_report_is_written_into_the_model_folder(tmp_path):
    """`mrl eval RUN_DIR` writes RUN_DIR/eval-DATASET/: not a file the model loads."""
    model, cache = _model_folder(tmp_path / "model"), tmp_path / "cache"
    enc = _CountingEncoder()
    encode_cached(model, ["wing"], cache, encoder=enc)
    (model / "eval-cranfield").mkdir()
    (model / "eval-cranfield" / "results.json").write_text("[]")
    (model / ".lock").write_text("")
    encode_cached(model, ["wing"], cache, encoder=enc)
    assert enc.calls == 1


# ---------------------------------------------------------------- Cranfield, independently
def _reference_cranfield(folder):
    """A plain parse of the three files as their README describes them."""
    docs = {}
    text = (folder / "cran.all.1400").read_text("ascii")
    for record in re.split(r"^\.I ", text, flags=re.M)[1:]:
        lines = record.split("\n")
        fields, field = {}, None
        for line in lines[1:]:
            if line.strip() in (".T", ".A", ".B", ".W"):
                field = line.strip()[1]
                fields.setdefault(field, [])  # docs 576 and 578 have two .W: both kept
                continue
            if field is not None:
                fields[field].append(line)
        title = " ".join(" ".join(fields.get("T", [])).split())
        body = " ".join(" ".join(fields.get("W", [])).split())
        docs[lines[0].strip()] = (title, body.removesuffix(" .") if body.endswith(". .") else body)
    qtext = (folder / "cran.qry").read_bytes().decode("ascii").replace("\r\n", "\n")
    queries = []
    for record in re.split(r"^\.I ", qtext, flags=re.M)[1:]:
        lines = record.split("\n")
        queries.append(" ".join(" ".join(lines[lines.index(".W") + 1 :]).split()))
    qrels = {}
    for line in (folder / "cranqrel").read_text("ascii").splitlines():
        if line.split():
            q, d, grade = map(int, line.split())
            if 1 <= grade <= 4:
                qrels.setdefault(str(q), {})[str(d)] = 5.0 - grade
    return docs, queries, qrels


def test_cranfield_matches_an_independent_parse():
    from mrl.text.cranfield import find_cranfield, load_cranfield

    try:
        folder = find_cranfield(download=False)
    except FileNotFoundError:
        pytest.skip("no Cranfield copy on this machine")
    docs, queries, qrels = _reference_cranfield(folder)
    ds = load_cranfield(folder, download=False)
    assert [d for d, (t, b) in docs.items() if not t and not b] == ["471", "995"]
    assert ds.doc_ids == [d for d, (t, b) in docs.items() if t or b]
    squash = lambda s: " ".join(s.split())  # noqa: E731  (the loader keeps inner spacing)
    assert [(squash(t), squash(b)) for t, b in zip(ds.titles, ds.bodies)] == [
        docs[d] for d in ds.doc_ids
    ]
    assert [squash(q) for q in ds.queries] == queries
    assert ds.query_ids == [str(i) for i in range(1, len(queries) + 1)]  # positions
    # the loader drops the one judgment of dropped document 995 (query 125): it cannot be found
    assert qrels["125"]["995"] == 2.0
    assert ds.qrels == {q: {d: g for d, g in j.items() if d != "995"} for q, j in qrels.items()}
    gains = ds.gain_matrix()
    col = {d: j for j, d in enumerate(ds.doc_ids)}
    for q, judged in qrels.items():
        for d, g in judged.items():
            if d in col:
                assert gains[int(q) - 1, col[d]] == g
    assert gains.sum() == sum(g for j in qrels.values() for d, g in j.items() if d in col)
