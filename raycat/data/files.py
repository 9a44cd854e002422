"""Reading data files (local or on an object store, compressed or not) into raw records, with errors a
user can act on.

Every problem names the file and line: invalid UTF-8, a JSON Lines line that is not JSON (a truncated
last line), a CSV that pandas cannot parse. A UTF-8 byte-order mark is read normally. A ``.json`` file
may be a JSON array, a column-oriented object, or JSON Lines (the MedMCQA release files are JSON Lines
under a ``.json`` suffix).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from raycat.data.sources import basename, split_name
from raycat.errors import RaycatError
from raycat.storage import rundir


@dataclass(frozen=True)
class BadLine:
    """One line of a JSON Lines file that is not a JSON object: a bad row, named by file and line."""

    where: str  # "<file> line <n>"
    reason: str
    text: str


TOO_DEEP = "JSON nested deeper than the parser allows (no question row is nested like this)"


def _decode(f: str, data: bytes) -> str:
    try:
        # A byte-order mark is not part of the first column's name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise RaycatError(
            f"data.path: {f} line {line}, column {col}: not valid UTF-8 (byte 0x{data[e.start]:02x}); "
            "re-save the file as UTF-8"
        ) from None


def _json_lines(f: str, text: str) -> list[dict | BadLine]:
    out: list[dict | BadLine] = []
    name = basename(f)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            last = n == len(text.splitlines())
            hint = " (the last line: was the file cut off?)" if last else ""
            out.append(BadLine(f"{name} line {n}", f"not valid JSON: {e.msg} at column {e.colno}{hint}", line[:200]))
            continue
        except RecursionError:
            out.append(BadLine(f"{name} line {n}", TOO_DEEP, line[:200]))
            continue
        if not isinstance(obj, dict):
            out.append(BadLine(f"{name} line {n}", f"expected a JSON object, got {type(obj).__name__}", line[:200]))
            continue
        out.append(obj)
    return out


def _json(f: str, text: str) -> list[dict | BadLine]:
    head = text.lstrip()[:1]
    if head == "[" or head == "{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # Several objects, one per line: JSON Lines.
            if head == "{" and e.msg == "Extra data":
                return _json_lines(f, text)
            raise RaycatError(f"data.path: {f} line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            # One object per line may still be JSON Lines, where only the deep line is a bad row.
            if head == "{" and len(text.strip().splitlines()) > 1:
                return _json_lines(f, text)
            raise RaycatError(f"data.path: {f}: {TOO_DEEP}") from None
        if isinstance(obj, list):
            bad = [i for i, r in enumerate(obj) if not isinstance(r, dict)]
            if bad:
                raise RaycatError(f"data.path: {f}: item {bad[0]} of the JSON array is not an object")
            return obj
        if isinstance(obj, dict) and all(isinstance(v, list | dict) for v in obj.values()):
            # Column-oriented, as pandas writes it.
            return pd.DataFrame(obj).to_dict(orient="records")
        return [obj]
    if not head:
        return []
    raise RaycatError(f"data.path: {f} line 1: not JSON (starts with {text.lstrip()[:20]!r})")


def read_records(location: str | Path, names: list[str] | None = None) -> list[dict | BadLine]:
    """The raw records of one data file (a local path or a URI), in file order (blank JSON Lines lines
    skipped). ``names``: a CSV without a header row, read with these column names."""
    f = str(location)
    _, suffix, compression = split_name(basename(f))
    if suffix == ".parquet":
        try:
            with rundir.open_input_file(f) as stream:
                return pd.read_parquet(stream).to_dict(orient="records")
        except (OSError, ValueError) as e:
            raise RaycatError(f"data.path: {f} cannot be read as Parquet: {e}") from e
    if not suffix:
        raise RaycatError(
            f"unsupported data file {f}: use .parquet, .jsonl, .json or .csv (text files may end in .gz or .zst)"
        )
    try:
        data = rundir.read_input(f, compression)
    except OSError as e:
        raise RaycatError(f"data.path: {f} cannot be read ({e})") from e
    text = _decode(f, data)
    if not text.strip():
        return []
    if suffix == ".jsonl":
        return _json_lines(f, text)
    if suffix == ".json":
        return _json(f, text)
    try:
        # keep_default_na=False: an option literally reading "None" or "NA" is text, not missing.
        table = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            header=None if names else "infer",
            names=names,
        )
    except (ValueError, pd.errors.ParserError) as e:
        raise RaycatError(f"data.path: {f} cannot be read as CSV: {e}") from e
    return table.to_dict(orient="records")


def columns_of(records: list[dict | BadLine]) -> set[str]:
    """The fields of a file's records (the union: JSON Lines rows may omit optional fields)."""
    out: set[str] = set()
    for record in records:
        if isinstance(record, dict):
            out.update(record)
    return out
