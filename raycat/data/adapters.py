"""Canonical question records, dataset adapters and row validation.

Every adapter maps one public schema (as published on the HF Hub) to the canonical record
``id, question, options, gold, category, source``. ``gold`` is an option letter (A, B, ...) for
multiple choice and a normalized string/number for free-form. Bad rows are never dropped silently:
they raise ``BadRowError`` naming row and field, or go to a quarantine list with the reason.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raycat.config import DataConfig
from raycat.data.answers import parse_number
from raycat.data.files import BadLine, columns_of, read_records
from raycat.data.sources import basename, package_path, split_name
from raycat.errors import MissingInputError, RaycatError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A row's place in the corpus, ``_order``: its shard's index << ORDER_BITS | its row in the shard.
ORDER_BITS = 32
COLUMNS = ["id", "question", "options", "gold", "category", "source"]


class BadRowError(RaycatError, ValueError):
    def __init__(self, row: int | str, field: str, reason: str, fix: str = ""):
        self.row, self.field, self.reason, self.fix = row, field, reason, fix
        msg = f"bad input row {row}, field '{field}': {reason}"
        if fix:
            msg += f". {fix}"
        msg += ". Set data.on_bad_rows=quarantine to set such rows aside instead."
        super().__init__(msg)

    def __reduce__(self):
        """Raised in a Ray task: rebuilt on the driver from its fields."""
        return (BadRowError, (self.row, self.field, self.reason, self.fix))


class _Bad(Exception):
    """Raised inside adapters; turned into BadRowError/quarantine with the row number."""

    def __init__(self, field: str, reason: str, fix: str = ""):
        self.field, self.reason, self.fix = field, reason, fix


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, field: str) -> str:
    if _missing(value):
        raise _Bad(field, "missing value")
    if not isinstance(value, str):
        raise _Bad(
            field, f"expected text, got {type(value).__name__} {value!r}", "Quote the value or fix the column type"
        )
    if not value.strip():
        raise _Bad(field, "empty text")
    problem = text_problem(value)
    if problem:
        raise _Bad(field, problem, "Fix or remove the row in the data file")
    return value


# Characters a reader cannot see: format characters (zero-width space/joiners, BOM, soft hyphen, bidi
# marks: category Cf) and whitespace other than str.strip's.
_INVISIBLE = {"Cf", "Zs", "Zl", "Zp", "Cc"}


def text_problem(value: str) -> str:
    """Why a text is not a usable question or option ("" when it is): nothing visible in it, or
    characters that cannot be stored (``encoding_problem``)."""
    if all(unicodedata.category(char) in _INVISIBLE for char in value):
        shown = " ".join(sorted({f"U+{ord(char):04X}" for char in value}))
        return f"no visible text (only invisible characters: {shown})"
    return encoding_problem(value)


def encoding_problem(value: str) -> str:
    """A NUL character, or an unpaired UTF-16 surrogate (invalid Unicode that cannot be written as
    UTF-8, e.g. from a broken JSON escape); "" when there is neither."""
    if "\x00" in value:
        return "a NUL character (U+0000) in the text: the file is probably binary or mis-encoded"
    try:
        # C speed: only an unpaired surrogate fails to encode.
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        surrogate = ord(value[error.start])
        return f"an unpaired surrogate U+{surrogate:04X} (invalid Unicode, e.g. a broken JSON \\u escape)"
    return ""


def _as_list(value: Any, field: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _missing(value):
        raise _Bad(field, "missing value")
    if not isinstance(value, list | tuple):
        raise _Bad(field, f"expected a list of options, got {type(value).__name__}")
    return list(value)


def _index(value: Any, field: str, base: int = 0) -> int:
    if isinstance(value, bool) or _missing(value):
        raise _Bad(field, f"expected an integer answer index, got {value!r}")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise _Bad(field, f"expected an integer answer index, got {value!r}") from None
    if as_int != value and str(as_int) != str(value).strip():
        raise _Bad(field, f"expected an integer answer index, got {value!r}")
    return as_int - base


def _gold_from_index(idx: int, n: int, field: str) -> str:
    if not 0 <= idx < n:
        raise _Bad(field, f"answer index {idx} is not among the {n} options")
    return LETTERS[idx]


# --- adapters: raw row dict -> partial canonical record (id may be None: row index is used) ---


def _mmlu_pro(row: dict, _cfg: DataConfig) -> dict:
    options = [_text(o, "options") for o in _as_list(row.get("options"), "options")]
    idx = _index(row.get("answer_index"), "answer_index")
    gold = _gold_from_index(idx, len(options), "answer_index")
    letter = row.get("answer")
    if not _missing(letter) and str(letter).strip().upper() != gold:
        raise _Bad("answer", f"letter {letter!r} disagrees with answer_index {idx} ({gold})")
    return {
        "id": row.get("question_id"),
        "question": row.get("question"),
        "options": options,
        "gold": gold,
        "category": row.get("category"),
    }


def _mmlu(row: dict, _cfg: DataConfig) -> dict:
    # cais/mmlu: choices (list) + answer (0-3); the CSV export: choice0..choice3 + answer (0-3); the
    # original header-less CSVs: the answer as a letter.
    if "choices" in row:
        raw = _as_list(row.get("choices"), "choices")
    else:
        raw = [row.get(f"choice{i}") for i in range(4)]
    options = [_text(o, "choices") for o in raw]
    answer = row.get("answer")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        gold = answer.strip().upper()
        if gold not in LETTERS[: len(options)]:
            raise _Bad("answer", f"answer letter {answer!r} is not among the {len(options)} options")
    else:
        gold = _gold_from_index(_index(answer, "answer"), len(options), "answer")
    return {
        "id": None,
        "question": row.get("question"),
        "options": options,
        "gold": gold,
        "category": row.get("subject"),
    }


def _medmcqa(row: dict, cfg: DataConfig) -> dict:
    options = [_text(row.get(k), k) for k in ("opa", "opb", "opc", "opd")]
    cop = _index(row.get("cop"), "cop")
    if cop == -1:
        raise _Bad("cop", "no published answer (cop=-1, the MedMCQA test split)", "Use the validation split")
    # load_questions sets the base (detected or configured).
    cop -= cfg.medmcqa_cop_base or 0
    gold = _gold_from_index(cop, 4, "cop")
    return {
        "id": row.get("id"),
        "question": row.get("question"),
        "options": options,
        "gold": gold,
        "category": row.get("subject_name"),
    }


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def _gsm8k(row: dict, _cfg: DataConfig) -> dict:
    answer = _text(row.get("answer"), "answer")
    final = _GSM8K_FINAL.search(answer)
    if not final:
        raise _Bad("answer", "no '#### <number>' final answer")
    gold = parse_number(final.group(1))
    if gold is None:
        raise _Bad("answer", f"final answer {final.group(1)!r} is not exactly one number")
    return {"id": None, "question": row.get("question"), "options": [], "gold": gold, "category": "gsm8k"}


def _generic(row: dict, cfg: DataConfig) -> dict:
    cols = cfg.columns
    assert cols is not None  # guaranteed by DataConfig validation
    if cols.options is None:
        options = []
    elif isinstance(cols.options, list):
        options = [_text(row.get(c), c) for c in cols.options]
    else:
        options = [_text(o, cols.options) for o in _as_list(row.get(cols.options), cols.options)]
    raw = row.get(cols.answer)
    fmt, field = cfg.answer_format, cols.answer
    if fmt == "letter":
        letter = _text(raw, field).strip().upper()
        if len(letter) != 1 or letter not in LETTERS[: len(options)]:
            raise _Bad(field, f"gold {raw!r} is not among the option letters {LETTERS[: len(options)]!r}")
        gold = letter
    elif fmt in ("index0", "index1"):
        gold = _gold_from_index(_index(raw, field, base=1 if fmt == "index1" else 0), len(options), field)
    elif fmt == "text":
        text = _text(raw, field)
        if text not in options:
            raise _Bad(field, f"gold {text!r} is not one of the options")
        gold = LETTERS[options.index(text)]
    else:
        gold = parse_number(str(raw)) if not _missing(raw) else None
        if gold is None:
            raise _Bad(field, f"gold {raw!r} is not exactly one number")
    return {
        "id": row.get(cols.id) if cols.id else None,
        "question": row.get(cols.question),
        "options": options,
        "gold": gold,
        "category": row.get(cols.category) if cols.category else None,
    }


ADAPTERS: dict[str, Callable[[dict, DataConfig], dict]] = {
    "mmlu_pro": _mmlu_pro,
    "mmlu": _mmlu,
    "medmcqa": _medmcqa,
    "gsm8k": _gsm8k,
    "generic": _generic,
}


# --- reading raw tables ---


def resolve_data_path(path: str) -> Path | None:
    """A local path, or ``package:<pkg>/<relative path>`` inside an installed package; None for
    anything else (a hub id, a URI, a glob: ``sources.resolve`` lists their files)."""
    if path.startswith("package:"):
        return package_path(path)
    local = Path(path).expanduser()
    return local if local.exists() else None


def required_columns(cfg: DataConfig) -> list[str | tuple[str, ...]]:
    """The fields a source's adapter reads; a tuple is a set of alternatives (any one suffices)."""
    if cfg.source == "generic":
        cols = cfg.columns
        need: list[str | tuple[str, ...]] = [cols.question, cols.answer]
        if isinstance(cols.options, list):
            need += cols.options
        elif cols.options is not None:
            need.append(cols.options)
        return need + [c for c in (cols.id, cols.category) if c]
    return {
        "mmlu_pro": ["question", "options", "answer_index"],
        "mmlu": ["question", "answer", ("choices", "choice0")],
        "medmcqa": ["question", "opa", "opb", "opc", "opd", "cop"],
        "gsm8k": ["question", "answer"],
    }[cfg.source]


def check_columns(cfg: DataConfig, have: set[str], where: str) -> None:
    """A file or hub split whose columns are not the adapter's fails here, naming what it expects."""
    missing = [c for c in required_columns(cfg) if not (set(c) & have if isinstance(c, tuple) else c in have)]
    if missing:
        names = [" or ".join(c) if isinstance(c, tuple) else c for c in missing]
        expected = [" or ".join(c) if isinstance(c, tuple) else c for c in required_columns(cfg)]
        raise RaycatError(
            f"{where}: no column(s) {', '.join(names)} for data.source={cfg.source} (it reads "
            f"{', '.join(expected)}; the file has {', '.join(sorted(map(str, have))) or 'no columns'}). "
            + (
                "Fix data.columns"
                if cfg.source == "generic"
                else "Pick the matching data.source or data.source=generic"
            )
        )


# The original MMLU release (Hendrycks et al., data.tar): one CSV per subject and split, no header row,
# question, the four options, then the answer as a letter.
MMLU_HEADERLESS = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def headerless_mmlu(records: list[dict | BadLine]) -> bool:
    """Whether a CSV read with a header is really the original MMLU layout: six columns, the "header"
    a question whose last field is an answer letter."""
    header = [str(name).strip() for name in (records[0] if records and isinstance(records[0], dict) else {})]
    return len(header) == 6 and "question" not in header and header[-1].upper() in ("A", "B", "C", "D")


def read_file(cfg: DataConfig, location: str) -> list[dict | BadLine]:
    """One data file's raw rows, in file order, as ``cfg.source`` reads them (the MMLU CSV layouts)."""
    records = read_records(location)
    stem, suffix, _ = split_name(basename(location))
    if cfg.source == "mmlu" and suffix == ".csv" and headerless_mmlu(records):
        records = read_records(location, names=MMLU_HEADERLESS)
    if records:
        check_columns(cfg, columns_of(records), f"data.path {location}")
    if cfg.source == "mmlu":
        # The MMLU CSV export has one file per subject (<subject>_<split>.csv) and no subject column.
        subject = re.sub(r"_(dev|val|test|train)$", "", stem)
        for row in records:
            if isinstance(row, dict) and "subject" not in row:
                row["subject"] = subject
    return records


def _read_hub(cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy import, only for hub loads

    try:
        dataset = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, revision=cfg.revision)
    except Exception as e:  # offline, typo, gated: all surface here
        raise MissingInputError(
            f"data.path {cfg.path!r} is not a local file and loading it from the hub failed: {e}. "
            "Point data.path at a local file in the same schema if the hub is unreachable."
        ) from e
    check_columns(cfg, set(dataset.column_names), f"data.path {cfg.path} (hub split {cfg.split})")
    for i, row in enumerate(dataset):
        yield str(i), row


# --- validation ---


def _validate(rec: dict, src: str, row_label: str) -> dict:
    question = _text(rec["question"], "question")
    options = rec["options"]
    if src != "gsm8k" and options is not None and 0 < len(options) < 2:
        raise _Bad("options", f"multiple choice needs at least 2 options, got {len(options)}")
    if len(options) > len(LETTERS):
        raise _Bad("options", f"{len(options)} options; at most {len(LETTERS)} are supported")
    if options and rec["gold"] not in LETTERS[: len(options)]:
        raise _Bad("answer", f"gold {rec['gold']!r} is not among the {len(options)} options")
    if not options and src in ("mmlu_pro", "mmlu", "medmcqa"):
        raise _Bad("options", "multiple choice needs at least 2 options, got 0")
    rid = rec["id"]
    if _missing(rid):
        rid = f"{src}-{row_label}"
    elif not isinstance(rid, str | int | np.integer):
        raise _Bad("id", f"expected text or integer id, got {type(rid).__name__}")
    category = rec["category"]
    if _missing(category):
        category = ""
    elif not isinstance(category, str):
        raise _Bad("category", f"expected text, got {type(category).__name__} {category!r}")
    for field, value in (("id", str(rid)), ("category", category)):
        if encoding_problem(value):
            raise _Bad(field, encoding_problem(value), "Fix or remove the row in the data file")
    return {
        "id": str(rid),
        "question": question,
        "options": list(options),
        "gold": str(rec["gold"]),
        "category": category,
        "source": src,
    }


def json_safe(row: dict) -> dict:
    return json.loads(pd.Series(_encodable(row)).to_json(default_handler=str))


def _encodable(value: Any) -> Any:
    """``value`` with each unpaired surrogate written as its escape text (e.g. ``\\ud800``), so a
    quarantined row can be written as UTF-8 (JSON, Parquet) and still shows what the file held."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


def cop_values(records: list[dict | BadLine]) -> set[int]:
    """The integer MedMCQA ``cop`` values of some rows: what the convention is decided from."""
    values = set()
    for row in records:
        if isinstance(row, dict):
            try:
                values.add(int(row.get("cop")))
            except (TypeError, ValueError):
                pass
    return values


def cop_base(cfg: DataConfig, values: set[int]) -> tuple[int, str]:
    """MedMCQA's ``cop`` convention for the whole corpus (every shard's ``cop_values``), never per row:
    (base, how it was decided)."""
    if cfg.medmcqa_cop_base is not None:
        return cfg.medmcqa_cop_base, "set by data.medmcqa_cop_base"
    # The test split's "no published answer": says nothing about the convention.
    values = values - {-1}
    if not values:
        return 0, "no published answers in the file (cop = -1)"
    if 0 in values and 4 in values:
        raise RaycatError(
            f"data.path {cfg.path}: MedMCQA 'cop' takes both 0 and 4, so neither convention (0-based on the "
            "hub, 1-based in the release files) fits every row; check the file"
        )
    if 4 in values:
        return 1, "detected: 1-based (a cop of 4 occurs; the MedMCQA release files' convention)"
    if 0 in values:
        return 0, "detected: 0-based (a cop of 0 occurs; the HF Hub's convention)"
    raise RaycatError(
        f"data.path {cfg.path}: MedMCQA 'cop' values {sorted(values)} fit both 0-based (hub) and 1-based (release "
        "files) answers; set data.medmcqa_cop_base to 0 or 1"
    )


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _ambiguity(rec: dict) -> tuple[str, bool]:
    """(why the gold option is ambiguous or "", whether two options read the same) for a valid row."""
    texts = [_norm(o) for o in rec["options"]]
    if len(set(texts)) == len(texts):
        return "", False
    gold = texts[LETTERS.index(rec["gold"])]
    # Two options read the same and one of them is the answer: ambiguous.
    if texts.count(gold) > 1:
        shown = rec["options"][LETTERS.index(rec["gold"])]
        return f"the gold option's text {shown!r} appears more than once, so the answer is ambiguous", True
    return "", True


def bad_record(order: int, row: str, field: str, reason: str, raw: Any, fix: str = "") -> dict:
    """A quarantine record (row, field, reason, raw) with its place in the corpus and the fix a
    ``BadRowError`` adds (both dropped before it is written)."""
    return {"row": row, "field": field, "reason": reason, "raw": raw, "_order": order, "_fix": fix}


def check_rows(
    cfg: DataConfig, records: list[dict | BadLine], shard: int, name: str
) -> tuple[pd.DataFrame, list[dict]]:
    """Every per-row rule on one shard's records (its MedMCQA ``cop`` base already decided): (valid
    rows, bad rows). Valid rows carry their place ``_order`` (shard << 32 | row), ``_label`` (the row
    name in messages: ``<name>:<row>``, or the row number when ``name`` is ""), and what only the whole
    corpus can settle: ``_ambiguous`` (the reason, or ""; quarantined unless the row is a duplicate id),
    ``_raw`` (for those rows' quarantine record) and ``_repeated`` (two options read the same)."""
    adapter = ADAPTERS[cfg.source]
    valid: list[dict] = []
    bad: list[dict] = []
    for i, raw in enumerate(records):
        order, label = shard << ORDER_BITS | i, f"{name}:{i}" if name else str(i)
        if isinstance(raw, BadLine):
            bad.append(bad_record(order, raw.where, "(line)", raw.reason, raw.text))
            continue
        try:
            rec = _validate(adapter(raw, cfg), cfg.source, label)
        except _Bad as problem:
            bad.append(bad_record(order, label, problem.field, problem.reason, json_safe(raw), problem.fix))
            continue
        ambiguous, repeated = _ambiguity(rec)
        raw_json = json_safe(raw) if ambiguous else None
        valid.append({**rec, "_order": order, "_label": label, "_ambiguous": ambiguous, "_raw": raw_json})
        valid[-1]["_repeated"] = repeated
    columns = [*COLUMNS, "_order", "_label", "_ambiguous", "_raw", "_repeated"]
    return pd.DataFrame(valid, columns=columns).astype({"_order": "int64", "_repeated": bool}), bad


def select_rows(questions: pd.DataFrame, limit: int | None, sample: int | None, seed: int) -> pd.DataFrame:
    """The rows ``selected(len(questions), ...)`` names, in corpus order."""
    return questions.iloc[selected(len(questions), limit, sample, seed)].reset_index(drop=True)


def selected(n_valid: int, limit: int | None, sample: int | None, seed: int) -> np.ndarray:
    """The positions (in corpus order, among the valid rows) data.sample and data.limit keep: a
    function of the count alone, so shards can apply it without the rows. The same draw as pandas'
    ``DataFrame.sample(n=sample, random_state=seed)``, so a corpus keeps its selection."""
    positions = np.arange(n_valid)
    if sample is not None and sample < n_valid:
        positions = np.sort(np.random.RandomState(seed).choice(n_valid, size=sample, replace=False))
    return positions[:limit] if limit is not None else positions
