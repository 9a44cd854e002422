"""The split stage over a run dir, streamed: memory is a batch of rows plus compact arrays per corpus
row, never a frame of the corpus. At the peak (deciding) ~150-200 bytes a row plus the ids' bytes
(keys, a 128-bit duplicate digest, id ranks, entropies, category codes and their sort temporaries);
while the files are written, ~20 bytes a row (two int8 codes and the merge's keys).

1. scores.parquet's keys, entropies and idk flags, then questions.parquet's keys, duplicate digests,
   categories and ids, read in batches;
2. ``plan.assign`` decides held-out rows, bands and balancing on those arrays;
3. the scores, put in questions order by ``merge.OrderedParts``, are joined to the questions batch by
   batch and written to the band, test and skipped files (``merge.ParquetSink``, atomic). skipped.parquet
   is in questions order (the whole-frame split wrote the idk rows first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from raycat.config import RaycatConfig, for_workers, save_config
from raycat.errors import MissingInputError, RaycatError
from raycat.ray_env import ray_session, remote_call
from raycat.split import holdout, plan, rules
from raycat.split.rules import BANDS
from raycat.storage import merge, rowkey, rundir

SCORE_COLUMNS = ["entropy", "predicted", "correct", "idk", "option_mass", "template_hash", "entropy_mode"]
GREEDY_COLUMNS = ["predicted_greedy", "correct_greedy"]
SKIP_IDK = "student answered 'I don't know' (paper preset fallback)"
SKIP_UNDRAWN = "not drawn by split.balance_per_band or split.test_balance"
# Where each question row goes: a band file (0-2, rules.BANDS), test, skipped (two reasons), nowhere.
TEST, IDK, UNDRAWN, NOWHERE = 3, 4, 5, -1
ROW_GROUP = 65536
BUCKET_ROWS = merge.BUCKET_ROWS


def _inputs(run_dir: str) -> tuple[str, str, str]:
    scores = rundir.join(run_dir, "score", "scores.parquet")
    if not rundir.exists(scores):
        raise MissingInputError(f"{scores} not found: run `raycat score` with this config first")
    questions = rundir.join(run_dir, "questions", "questions.parquet")
    if not rundir.exists(questions):
        raise MissingInputError(f"{questions} not found: rerun `raycat score` with this config")
    missing = [c for c in ["row_hash", *SCORE_COLUMNS] if c not in rundir.parquet_columns(scores)]
    if missing or "row_hash" not in rundir.parquet_columns(questions):
        raise MissingInputError(f"{scores} was written by an older raycat: rerun `raycat score`")
    return scores, questions, rundir.join(run_dir, "score", "skipped.parquet")


def _scores(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, entropy, idk flag) of scores.parquet's rows, in file order."""
    keys, entropy, idk = [np.empty(0, dtype=np.uint64)], [np.empty(0)], [np.empty(0, dtype=bool)]
    for batch in rundir.iter_parquet(path, ["id", "row_hash", "entropy", "idk"]):
        keys.append(rowkey.key64(batch))
        entropy.append(batch["entropy"].to_numpy(dtype=np.float64, na_value=np.nan))
        idk.append(batch["idk"].fillna(False).astype(bool).to_numpy())
    return np.concatenate(keys), np.concatenate(entropy), np.concatenate(idk)


class _Questions:
    """questions.parquet's per-row arrays, read in batches."""

    def __init__(self, path: str):
        keys, digests, categories, ids, names = [], [], [], [], {}
        wanted = ["id", "row_hash", "question", "options", "category"]
        present = rundir.parquet_columns(path)
        for batch in rundir.iter_parquet(path, [c for c in wanted if c in present]):
            keys.append(rowkey.key64(batch))
            digests.append(holdout.group_digests(batch["question"], batch["options"]))
            values = batch["category"].fillna("").astype(str) if "category" in batch else [""] * len(batch)
            categories.append(np.fromiter((names.setdefault(v, len(names)) for v in values), np.int32, len(batch)))
            ids.append(pa.array(batch["id"].astype(str).to_numpy(), type=pa.string()))
        self.keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
        self.digests = np.concatenate(digests) if digests else np.empty((0, 2), dtype=np.uint64)
        self.ids = pa.chunked_array(ids, type=pa.string())
        # Codes into the sorted names (the order a groupby over the names would take).
        self.names = np.array(sorted(names), dtype=object)
        to_sorted = np.empty(len(names), dtype=np.int32)
        to_sorted[np.argsort(np.array(list(names), dtype=object))] = np.arange(len(names))
        self.categories = to_sorted[np.concatenate(categories)] if categories else np.empty(0, dtype=np.int32)


def _destinations(cfg: RaycatConfig, scores: str, questions: str, skipped: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(destination per question row, band per question row, thresholds info)."""
    s_keys, s_entropy, s_idk = _scores(scores)
    q = _Questions(questions)
    twice = f"{scores} holds a question twice (one id and content): rerun `raycat score`"
    at = merge.positions(*merge.key_index(s_keys, twice), q.keys)
    scored = at >= 0
    done = scored.copy()
    if rundir.exists(skipped):
        done |= rundir.file_keys(skipped).contains(q.keys)
    # The same id and content: questions.parquet is rewritten by each score run, scores only when it finishes.
    if stale := int((~done).sum()):
        raise MissingInputError(
            f"{stale} question(s) of {questions} have no score for their current content in "
            f"{scores} (an interrupted or older `raycat score`); rerun `raycat score`"
        )
    if len(s_keys):
        entropy, idk = np.where(scored, s_entropy[at.clip(min=0)], np.nan), scored & s_idk[at.clip(min=0)]
    else:  # every question set aside by the score stage
        entropy, idk = np.full(len(q.keys), np.nan), np.zeros(len(q.keys), dtype=bool)
    del s_keys, s_entropy, s_idk, at
    # np.quantile would turn one NaN into NaN thresholds and every row into "hard".
    missing = np.flatnonzero(scored & ~idk & np.isnan(entropy))
    if len(missing):
        examples = ", ".join(q.ids.take(pa.array(missing[:3])).to_pylist())
        raise RaycatError(
            f"{len(missing)} scored row(s) have no entropy (e.g. {examples}) in {scores}; rerun `raycat score` "
            "(a scores.parquet edited by hand, or an older raycat)"
        )
    # "I don't know" answers (paper preset) have no usable entropy rank; set aside, never silently.
    rows = np.flatnonzero(scored & ~idk)
    rank = holdout.id_ranks(q.ids.take(pa.array(rows)))
    labels = holdout.group_labels(q.digests[rows], rank)
    del q.digests, q.ids
    a = plan.assign(entropy[rows], rank, labels, q.categories[rows], q.names, cfg.split)
    dest = np.full(len(q.keys), NOWHERE, dtype=np.int8)
    dest[scored & idk] = IDK
    dest[rows] = np.where(a.kept, np.where(a.test, TEST, a.band), UNDRAWN)
    band = np.zeros(len(q.keys), dtype=np.int8)
    band[rows] = a.band
    a.info["skipped"] = {"idk": int((dest == IDK).sum()), "not_drawn_by_balancing": int((dest == UNDRAWN).sum())}
    return dest, band, a.info


def _joined(questions: str, scores: str, columns: list[str]) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """(question positions, rows) of every scored question in questions order: the question's columns
    and its score ``columns``, a questions batch at a time."""
    ordered = merge.OrderedParts(scores, questions, BUCKET_ROWS, files=[scores], positions=True)
    for start, batch, scored in merge.aligned([questions], ordered, ROW_GROUP):
        if not len(scored):
            continue
        rows = batch.iloc[scored["_pos"].to_numpy() - start].reset_index(drop=True)
        for column in columns:
            rows[column] = scored[column].to_numpy()
        yield scored["_pos"].to_numpy(), rows


def split_files(cfg: RaycatConfig) -> dict:
    """Scores + questions → easy / medium / hard (+ test) Parquet files, skipped.parquet and
    thresholds.json (the pure work; ``run`` runs it as a Ray task, so the rows stay on a worker)."""
    scores, questions, skipped = _inputs(cfg.run_dir)
    dest, band, info = _destinations(cfg, scores, questions, skipped)
    score_schema = rundir.parquet_schema(scores)
    columns = SCORE_COLUMNS + [c for c in GREEDY_COLUMNS if c in score_schema.names]
    base = pa.schema([*rundir.parquet_schema(questions), *(score_schema.field(c) for c in columns)])
    split_dir = rundir.join(cfg.run_dir, "split")
    outputs = {i: rundir.join(split_dir, f"{b}.parquet") for i, b in enumerate(BANDS)}
    test_path = rundir.join(split_dir, "test.parquet")
    if (dest == TEST).any():
        outputs[TEST] = test_path
    with contextlib.ExitStack() as stack:
        sink = {
            code: stack.enter_context(merge.ParquetSink(path, base.append(pa.field("band", pa.string())), ROW_GROUP))
            for code, path in outputs.items()
        }
        skipped_sink = stack.enter_context(
            merge.ParquetSink(
                rundir.join(split_dir, "skipped.parquet"), base.append(pa.field("skip_reason", pa.string())), ROW_GROUP
            )
        )
        for positions, rows in _joined(questions, scores, columns):
            to, bands = dest[positions], rules.NAMES[band[positions]]
            for code, out in sink.items():
                out.write(rows[to == code].assign(band=bands[to == code]))
            aside = (to == IDK) | (to == UNDRAWN)
            skipped_sink.write(rows[aside].assign(skip_reason=np.where(to[aside] == IDK, SKIP_IDK, SKIP_UNDRAWN)))
    if TEST not in outputs:
        # A test set of an earlier split with other settings must not be evaluated on.
        rundir.remove_file(test_path)
    rundir.write_json(rundir.join(split_dir, "thresholds.json"), info)
    return info


def run(cfg: RaycatConfig) -> dict:
    """The split stage, as a Ray task: the bands are written on a worker; the driver gets the summary."""
    import ray

    with ray_session(cfg.ray, cfg.run_dir):
        info = remote_call(ray.remote(num_cpus=1)(split_files), for_workers(cfg))
    save_config(cfg, "split")
    return info
