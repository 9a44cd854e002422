"""Adapters on small local files in each public hub schema, and every bad-row rule."""

import json

import pandas as pd
import pytest

from raycat.config import ColumnMap, DataConfig
from raycat.data.adapters import BadRowError, _read_hub, resolve_data_path
from raycat.data.corpus import load_questions
from raycat.errors import RaycatError


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(source, path, **kw):
    return load_questions(DataConfig(source=source, path=path, **kw))


def test_mmlu_pro_parquet_schema(tmp_path):
    rows = [
        {
            "question_id": 70,
            "question": "Q?",
            "options": ["a", "b", "c"],
            "answer": "C",
            "answer_index": 2,
            "cot_content": "",
            "category": "law",
            "src": "ori_mmlu-law",
        }
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")
    df, bad, n = load("mmlu_pro", str(tmp_path / "test.parquet"))
    assert n == 1 and not bad
    rec = df.iloc[0]
    assert (rec.id, rec.gold, rec.category, list(rec.options), rec.source) == (
        "70",
        "C",
        "law",
        ["a", "b", "c"],
        "mmlu_pro",
    )


def test_mmlu_hub_schema_and_csv_export(tmp_path):
    p = jsonl(
        tmp_path / "m.jsonl", [{"question": "Q", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 3}]
    )
    questions, _, _ = load("mmlu", p)
    assert (
        questions.iloc[0].gold == "D" and questions.iloc[0].category == "anatomy" and questions.iloc[0].id == "mmlu-0"
    )
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "virology_dev.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nQ,None,NA,2,3,1\n")
    questions, _, _ = load("mmlu", str(csv_dir))
    # "None"/"NA" are option texts, not missing values; numbers stay text.
    assert list(questions.iloc[0].options) == ["None", "NA", "2", "3"]
    assert questions.iloc[0].gold == "B" and questions.iloc[0].category == "virology"


def test_medmcqa_schema_cop_is_zero_based(tmp_path):
    row = {
        "id": "abc",
        "question": "Q",
        "opa": "a",
        "opb": "b",
        "opc": "c",
        "opd": "d",
        "cop": 0,
        "subject_name": "Anatomy",
    }
    df, _, _ = load("medmcqa", jsonl(tmp_path / "m.jsonl", [row]))
    assert (df.iloc[0].id, df.iloc[0].gold, df.iloc[0].category) == ("abc", "A", "Anatomy")


def test_medmcqa_test_split_without_answers_is_explained(tmp_path):
    row = {"id": "x", "question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1}
    with pytest.raises(BadRowError, match=r"row 0, field 'cop': no published answer.*validation split"):
        load("medmcqa", jsonl(tmp_path / "m.jsonl", [row]))


def test_gsm8k_final_answer_is_normalized(tmp_path):
    rows = [
        {"question": "How many?", "answer": "5 + 7 = <<5+7=12>>12\n#### 1,234"},
        {"question": "Q2", "answer": "...\n#### 72.0"},
        # By value, not "the last number" (was "4")
        {"question": "Q3", "answer": "...\n#### -3/4"},
        {"question": "Q4", "answer": "...\n#### 2.5e3"},
    ]
    df, _, _ = load("gsm8k", jsonl(tmp_path / "g.jsonl", rows))
    assert list(df.gold) == ["1234", "72", "-0.75", "2500"] and list(df.options.map(len)) == [0, 0, 0, 0]
    bad = [{"question": "Q", "answer": "...\n#### 16 or 18"}]
    with pytest.raises(BadRowError, match="row 0, field 'answer'.*not exactly one number"):
        load("gsm8k", jsonl(tmp_path / "b.jsonl", bad))


def test_generic_columns_and_answer_formats(tmp_path):
    rows = [{"qid": "a", "q": "Q", "o1": "x", "o2": "y", "ans": "y", "t": "bio"}]
    p = jsonl(tmp_path / "g.jsonl", rows)
    cols = ColumnMap(id="qid", question="q", options=["o1", "o2"], answer="ans", category="t")
    questions, _, _ = load("generic", p, columns=cols, answer_format="text")
    assert (questions.iloc[0].id, questions.iloc[0].gold, questions.iloc[0].category) == ("a", "B", "bio")
    pd.DataFrame([{"q": "Q", "opts": ["x", "y", "z"], "ans": 3}]).to_parquet(tmp_path / "g.parquet")
    questions, _, _ = load(
        "generic",
        str(tmp_path / "g.parquet"),
        columns=ColumnMap(question="q", options="opts", answer="ans"),
        answer_format="index1",
    )
    assert questions.iloc[0].gold == "C"
    (tmp_path / "n.csv").write_text('question,answer\nHow much?,"$1,000"\n')
    questions, _, _ = load("generic", str(tmp_path / "n.csv"), columns=ColumnMap(options=None), answer_format="number")
    assert questions.iloc[0].gold == "1000" and list(questions.iloc[0].options) == []


def test_package_path_resolves_inside_an_installed_package():
    p = resolve_data_path("package:raycat/config.py")
    assert p.is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_data_path("package:no_such_pkg_xyz/data.jsonl")


def test_unreachable_hub_name_gives_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a local file and loading it from the hub failed"):
        load("mmlu_pro", "TIGER-Lab/MMLU-Pro-definitely-not-cached")


GOOD = {
    "question_id": 1,
    "question": "Q",
    "options": ["a", "b", "c"],
    "answer": "A",
    "answer_index": 0,
    "category": "c",
}
BAD_ROWS = [
    ({"question": None}, "question", "missing value"),
    ({"question": "   "}, "question", "empty text"),
    ({"question": 42}, "question", "expected text"),
    ({"options": ["only"], "answer_index": 0, "answer": "A"}, "options", "at least 2 options"),
    ({"options": ["a", 5, "c"]}, "options", "expected text"),
    ({"answer_index": 7, "answer": None}, "answer_index", "not among the 3 options"),
    ({"answer": "B"}, "answer", "disagrees with answer_index"),
    ({"category": 3}, "category", "expected text"),
    # Text a reader cannot see: zero-width space/joiner, BOM, ideographic and no-break spaces.
    ({"question": "\u200b\u3000\u200d"}, "question", "no visible text"),
    ({"question": "\ufeff\u00a0"}, "question", "no visible text"),
    ({"options": ["a", "\u200b", "c"]}, "options", "no visible text"),
    ({"question": "Q\x00Q"}, "question", "NUL character"),
    ({"question": "Q \ud800"}, "question", "unpaired surrogate"),
    ({"category": "law\udfff"}, "category", "unpaired surrogate"),
    ({"question_id": "q\x00"}, "id", "NUL character"),
]


@pytest.mark.parametrize("patch,field,reason", BAD_ROWS, ids=[f"{b[1]}-{b[2][:12]}" for b in BAD_ROWS])
def test_bad_row_errors_name_row_and_field(tmp_path, patch, field, reason):
    rows = [GOOD, {**GOOD, "question_id": 2, **patch}]
    p = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(BadRowError) as e:
        load("mmlu_pro", p)
    assert e.value.row == "1" and e.value.field == field and reason in e.value.reason
    assert "data.on_bad_rows=quarantine" in str(e.value)
    df, bad, n = load("mmlu_pro", p, on_bad_rows="quarantine")
    assert n == 2 and list(df.id) == ["1"]
    assert bad[0]["row"] == "1" and bad[0]["field"] == field and reason in bad[0]["reason"]


def test_duplicate_ids_are_bad_rows(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    with pytest.raises(BadRowError, match=r"row 1, field 'id': duplicate id '1' \(first seen at row 0\)"):
        load("mmlu_pro", p)
    df, bad, _ = load("mmlu_pro", p, on_bad_rows="quarantine")
    assert len(df) == 1 and bad[0]["field"] == "id"


def test_generic_gold_not_among_options(tmp_path):
    p = jsonl(tmp_path / "g.jsonl", [{"question": "Q", "options": ["a", "b"], "answer": "E"}])
    with pytest.raises(BadRowError, match=r"field 'answer': gold 'E' is not among the option letters 'AB'"):
        load("generic", p, columns=ColumnMap())


def test_synthetic_generator_is_seeded_and_valid():
    cfg = DataConfig(source="synthetic")
    a, bad, _ = load_questions(cfg)
    b, _, _ = load_questions(cfg)
    assert not bad and len(a) == 300 and a.equals(b)
    assert set(a.category) == {"1-digit", "2-digit", "3-digit"}
    for _, r in a.iterrows():
        a_, b_ = (int(x) for x in r.question.removeprefix("What is ").rstrip("?").split(" + "))
        assert r.options["ABCD".index(r.gold)] == str(a_ + b_)
        assert len(set(r.options)) == 4


def test_real_mmlu_dev_csvs(shared_data):
    df, bad, n = load("mmlu", str(shared_data / "mmlu_dev"))
    assert n == 285 and len(df) + len(bad) == 285 and df.id.is_unique
    assert df.category.nunique() == 57 and set(df.gold) <= set("ABCD")


def test_real_mmlu_pro_validation_parquet(shared_data):
    df, bad, n = load("mmlu_pro", str(shared_data / "mmlu_pro_validation" / "validation.parquet"))
    assert n == 70 and not bad and df.category.nunique() == 14
    assert df.options.map(len).between(3, 10).all()


def test_hub_loader_reads_a_hub_style_repository_layout(tmp_path):
    # The same `datasets.load_dataset(name, subset, split=...)` call that serves hub ids, pointed at a
    # local directory laid out like TIGER-Lab/MMLU-Pro on the hub (data/<split>-*.parquet).
    (tmp_path / "data").mkdir()
    rows = [{**GOOD, "question_id": i} for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    pd.DataFrame(rows[:1]).to_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet")
    got = list(_read_hub(DataConfig(source="mmlu_pro", path=str(tmp_path), split="test")))
    assert [r["question_id"] for _, r in got] == [0, 1, 2]
    got = list(_read_hub(DataConfig(source="mmlu_pro", path=str(tmp_path), split="validation")))
    assert len(got) == 1


def test_data_revision_pins_the_hub_load_and_is_refused_for_files(monkeypatch):
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{**GOOD, "question_id": 0}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(source="mmlu_pro", path="TIGER-Lab/MMLU-Pro", split="test", revision="3373e0b")
    assert len(list(_read_hub(cfg))) == 1
    assert calls == [(("TIGER-Lab/MMLU-Pro", None), {"split": "test", "revision": "3373e0b"})]
    for path in ("s3://bucket/corpus/", "/data/corpus.jsonl", "package:raycat/x.jsonl", None):
        with pytest.raises(ValueError, match="data.revision pins a hub dataset"):
            DataConfig(source="generic", columns=COLS, path=path, revision="v1")


def test_data_revision_with_a_relative_path_to_files_is_refused_before_any_task(tmp_path, monkeypatch):
    from raycat.config import validate_config
    from raycat.data.questions import stage_questions
    from raycat.errors import RaycatError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text(json.dumps(MCQ) + "\n")
    tree = {
        "run_dir": "run",
        "data": {"source": "generic", "path": "corpus.jsonl", "revision": "v1", "columns": COLS.model_dump()},
        "score": {"student": {"path": "unused"}},
    }
    with pytest.raises(RaycatError, match="data.revision='v1' pins a hub dataset, but data.path corpus.jsonl"):
        stage_questions(validate_config(tree))


# --- input handling: every problem names file, line/row and field ---

MCQ = {"question": "Q?", "options": ["a", "b"], "answer": "A"}
COLS = ColumnMap(question="question", options="options", answer="answer")


def test_jsonl_syntax_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(MCQ) + "\n" + json.dumps(MCQ) + "\n" + '{"question": "Q?", "opt')  # cut off
    with pytest.raises(BadRowError, match=r"row d.jsonl line 3, field '\(line\)': not valid JSON.*last line.*cut off"):
        load("generic", str(p), columns=COLS)
    p.write_text(json.dumps(MCQ) + "\nnot json at all\n" + json.dumps(MCQ) + "\n")
    df, bad, n = load("generic", str(p), columns=COLS, on_bad_rows="quarantine")
    assert n == 3 and len(df) == 2 and bad[0]["row"] == "d.jsonl line 2" and "not valid JSON" in bad[0]["reason"]
    # Ids stay row numbers: fixing line 2 renames nothing
    assert list(df.id) == ["generic-0", "generic-2"]


def test_a_byte_order_mark_is_read_normally(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"\xef\xbb\xbfquestion,options_a,options_b,answer\nQ?,x,y,B\n")
    df, _, _ = load(
        "generic", str(p), columns=ColumnMap(question="question", options=["options_a", "options_b"], answer="answer")
    )
    assert df.iloc[0].question == "Q?" and df.iloc[0].gold == "B"
    j = tmp_path / "d.jsonl"
    j.write_bytes(b"\xef\xbb\xbf" + json.dumps(MCQ).encode() + b"\n")
    assert load("generic", str(j), columns=COLS)[0].iloc[0].question == "Q?"


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(MCQ).encode() + b"\n" + b'{"question": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(RaycatError, match=r"d.jsonl line 2, column 18: not valid UTF-8 \(byte 0xe9\)"):
        load("generic", str(p), columns=COLS)


def test_an_input_with_no_rows_is_an_error(tmp_path):
    for name, text in (("e.jsonl", "\n\n"), ("e.csv", ""), ("e.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(RaycatError, match="no rows"):
            load("generic", str(tmp_path / name), columns=COLS)


def test_a_csv_whose_header_is_not_the_adapters_names_the_expected_columns(tmp_path):
    p = tmp_path / "physics_test.csv"
    p.write_text("Question,A,B,C,D,Answer\nQ?,1,2,3,4,A\n")  # another export's header
    with pytest.raises(RaycatError, match=r"no column\(s\) question, answer, choices or choice0 for data.source=mmlu"):
        load("mmlu", str(p))


def test_duplicate_option_texts_are_flagged_and_an_ambiguous_gold_is_a_bad_row(tmp_path):
    rows = [
        {"question": "Q1?", "options": ["yes", "Yes ", "no"], "answer": "C"},  # duplicate, gold not among them
        {"question": "Q2?", "options": ["yes", "yes", "no"], "answer": "A"},  # the gold's text twice
    ]
    df, bad, _ = load("generic", jsonl(tmp_path / "d.jsonl", rows), columns=COLS, on_bad_rows="quarantine")
    assert list(df.id) == ["generic-0"] and df.attrs["notes"]["duplicate_option_texts"]["ids"] == ["generic-0"]
    assert bad[0]["row"] == "1" and bad[0]["field"] == "options" and "ambiguous" in bad[0]["reason"]


def _medmcqa(cop, i=0):
    return {"id": f"m{i}", "question": f"Q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop}


def test_medmcqa_release_files_are_json_lines_with_one_based_cop(tmp_path):
    # train.json / dev.json of the MedMCQA release: JSON Lines under .json, cop 1..4.
    path = tmp_path / "dev.json"
    path.write_text("".join(json.dumps(_medmcqa(c, i)) + "\n" for i, c in enumerate([1, 4, 2, 3])))
    questions, _, _ = load("medmcqa", str(path))
    assert list(questions.gold) == ["A", "D", "B", "C"] and "1-based" in questions.attrs["notes"]["medmcqa_cop"]
    # The hub's convention, detected from the whole file, never per row.
    path.write_text("".join(json.dumps(_medmcqa(c, i)) + "\n" for i, c in enumerate([0, 3, 1, 2])))
    questions, _, _ = load("medmcqa", str(path))
    assert list(questions.gold) == ["A", "D", "B", "C"] and "0-based" in questions.attrs["notes"]["medmcqa_cop"]
    path.write_text("".join(json.dumps(_medmcqa(c, i)) + "\n" for i, c in enumerate([1, 2, 3])))
    with pytest.raises(RaycatError, match="set data.medmcqa_cop_base"):
        load("medmcqa", str(path))
    assert list(load("medmcqa", str(path), medmcqa_cop_base=1)[0].gold) == ["A", "B", "C"]


def test_json_nested_deeper_than_the_parser_allows_is_a_bad_row_named_by_line(tmp_path):
    deep = '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(MCQ) + "\n" + deep + "\n" + json.dumps(MCQ) + "\n")
    with pytest.raises(BadRowError, match=r"row d.jsonl line 2, field '\(line\)': JSON nested deeper"):
        load("generic", str(p), columns=COLS)
    df, bad, n = load("generic", str(p), columns=COLS, on_bad_rows="quarantine")
    assert n == 3 and len(df) == 2 and bad[0]["row"] == "d.jsonl line 2"
    # The first line deep too, and a whole-file JSON document: still named, never a raw RecursionError.
    p.write_text(deep + "\n" + json.dumps(MCQ) + "\n")
    _, bad, _ = load("generic", str(p), columns=COLS, on_bad_rows="quarantine")
    assert bad[0]["row"] == "d.jsonl line 1"
    one = tmp_path / "one.json"
    one.write_text("[" + deep + "]")
    with pytest.raises(RaycatError, match=r"one.json: JSON nested deeper"):
        load("generic", str(one), columns=COLS)


def test_the_original_header_less_mmlu_csvs_are_read(tmp_path):
    # As in the original release (data.tar): no header, question, four options, the answer letter.
    subject = tmp_path / "mmlu"
    subject.mkdir()
    (subject / "anatomy_test.csv").write_text(
        '"What is the embryological origin of the hyoid bone?",The first arch,The second arch,"A, and B",None,D\n'
        "Which nerve?,vagus,facial,optic,ulnar,b\n"
        "Bad letter?,w,x,y,z,E\n"
    )
    (subject / "virology_dev.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nQ,w,x,y,z,1\n")
    df, bad, n = load("mmlu", str(subject), on_bad_rows="quarantine")
    assert n == 4 and len(df) == 3
    first = df[df.category == "anatomy"].iloc[0]
    assert first.question.startswith("What is the embryological") and list(first.options)[2:] == ["A, and B", "None"]
    assert list(df[df.category == "anatomy"].gold) == ["D", "B"]
    assert df[df.category == "virology"].gold.tolist() == ["B"]
    assert bad[0]["field"] == "answer" and "answer letter 'E' is not among the 4 options" in bad[0]["reason"]
