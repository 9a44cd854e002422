"""Pure core of the teach stage: the attempt loop, the final-status policy, the accounting.

No Ray here; the engine is passed in, so the same loop runs inside a Ray Data actor or a unit test.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from raycat.data.answers import extract_answer
from raycat.engines.base import Generator, Sampling

# Per attempt: verified | wrong | truncated | no_answer (best first). Per row before any attempt:
# skipped (its prompt does not fit the teacher: the same next run unless the budget, which is in the
# cache key, changes). A request that failed for good: failed (retried by the next run).
# "truncated": cut off by sampling.max_tokens; never verified, whatever it contains, since a CoT that
# stops mid-sentence is not a training target even when an answer appeared before the cut.
_RANK = {"verified": 0, "wrong": 1, "truncated": 2, "no_answer": 3}
BANDS = ("easy", "medium", "hard")


def judge(generation, row: dict) -> tuple[str, str | None]:
    """(attempt status, extracted answer) of one generation for ``row`` (n_options, gold)."""
    extracted = extract_answer(generation.answer_text, int(row["n_options"]))
    if generation.finish_reason == "length":
        return "truncated", extracted
    return ("verified" if extracted == row["gold"] else "no_answer" if extracted is None else "wrong"), extracted


def attempt_schedule(first: Sampling, retries: int, temperatures: list[float]) -> list[Sampling]:
    """Attempt 0 uses ``first``; retry i uses temperatures[i-1] (the last repeats) and seed + i."""
    out = [first]
    for i in range(1, retries + 1):
        out.append(replace(first, temperature=temperatures[min(i - 1, len(temperatures) - 1)], seed=first.seed + i))
    return out


def teach_rows(engine: Generator, rows: list[dict], schedule: list[Sampling]) -> list[dict]:
    """Generate until each row's extracted answer matches gold or the schedule runs out.

    ``rows``: dicts with prompt (token ids, or chat messages for an HTTP teacher), n_options, gold, and
    skip_reason ("" = generate). Tokens and engine seconds are summed over all attempts: retries cost
    what they cost. A request that failed for good stops that row's attempts; with no earlier answer
    the row is "failed" with the error as its reason; a row with a skip_reason is "skipped", not sent.

    The row keeps its best attempt (verified > wrong > no answer) and, among equals, the FIRST one: for
    ``teach.on_wrong: keep`` the kept wrong response is the earliest, sampled at the schedule's first
    (normally lowest) temperature, not the last and most random retry.
    """
    results = [
        {
            "response": None,
            "extracted": None,
            "status": "skipped" if r["skip_reason"] else "no_answer",
            "reason": r["skip_reason"],
            "attempts": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "engine_seconds": 0.0,
            "finish_reason": None,
        }
        for r in rows
    ]
    pending = [i for i, r in enumerate(rows) if not r["skip_reason"]]
    for sampling in schedule:
        if not pending:
            break
        began = time.perf_counter()
        flat = engine.generate([rows[i]["prompt"] for i in pending], sampling)
        share = (time.perf_counter() - began) / len(pending)
        n = sampling.n
        stopped = set()
        for k, i in enumerate(pending):
            result = results[i]
            samples = flat[k * n : (k + 1) * n]
            best = _best(samples, rows[i])
            if best.error is not None:
                result["reason"] = best.error
                if result["attempts"] == 0:
                    result["status"] = "failed"
                stopped.add(i)
                continue
            status, extracted = judge(best, rows[i])
            # Only a strictly better attempt replaces the kept one: the earlier wins ties.
            if result["attempts"] == 0 or _RANK[status] < _RANK[result["status"]]:
                result.update(response=best.text, extracted=extracted, finish_reason=best.finish_reason, status=status)
            result["attempts"] += 1
            result["prompt_tokens"] += sum(s.prompt_tokens for s in samples)
            result["completion_tokens"] += sum(s.completion_tokens for s in samples)
            # A streaming engine reports each prompt's share of its busy time; concurrent calls overlap,
            # so their wall clocks would count the same engine time twice.
            own = [s.engine_seconds for s in samples if s.engine_seconds is not None]
            result["engine_seconds"] += sum(own) if own else share
        pending = [i for i in pending if results[i]["status"] != "verified" and i not in stopped]
    return results


def _best(samples: list, row: dict):
    """Of one attempt's n samples: a verified one, else one with an answer, else the first."""

    def rank(g):
        return len(_RANK) if g.error is not None else _RANK[judge(g, row)[0]]

    return min(samples, key=rank)


def resolve(attempt_status: str, response: str | None, gold: str, on_wrong: str) -> tuple[str, str | None, str]:
    """(final status, training target or None, reason) for one row after all teachers."""
    if attempt_status == "verified":
        return "verified", response, ""
    if attempt_status == "failed":
        return "failed", None, "teacher did not produce a response"
    if attempt_status == "skipped":
        return "skipped", None, "not sent to the teacher"
    what = {
        "wrong": "wrong answer",
        "truncated": "cut off at teach.sampling.max_tokens (raise it)",
    }.get(attempt_status, "no valid [[answer]] (none, an invalid one, or a hedge)")
    # The response is the first wrong attempt: teach_rows keeps that one.
    if on_wrong == "keep" and attempt_status == "wrong":
        return "kept_wrong", response, f"{what}; kept (teach.on_wrong=keep)"
    if on_wrong == "fallback_to_answer":
        return "fallback_to_answer", f"[[{gold}]]", f"{what}; plain answer target (teach.on_wrong)"
    return f"dropped_{attempt_status}", None, f"{what} after all attempts (teach.on_wrong={on_wrong})"


TOTALS = ("attempts", "prompt_tokens", "completion_tokens", "engine_seconds", "gpu_seconds")


def teacher_totals(rows: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per teacher of ``rows`` (teacher results): their count and the sums of ``TOTALS`` (a missing
    value counts 0). Sums of disjoint row sets add up: the streamed merge adds them per batch."""
    return {
        str(name): {"rows": len(answers), **{k: answers[k].sum() for k in TOTALS}}
        for name, answers in rows.groupby("teacher")
    }


def accounting(rows: pd.DataFrame, prices: dict[str, tuple[float, float, str] | None]) -> dict:
    """Token, time and cost totals of ``rows`` (every teacher's result for the rows taught)."""
    rows_taught = int(rows["_key"].nunique()) if "_key" in rows else int(len(rows))
    return priced(teacher_totals(rows), rows_taught, prices)


def priced(totals: dict[str, dict[str, float]], rows_taught: int, prices: dict) -> dict:
    """``accounting`` from ``teacher_totals`` (summed over batches): counts, tokens, seconds and cost."""
    per_teacher = {}
    for name, sums in totals.items():
        out = {"rows": int(sums["rows"]), **{k: int(sums[k]) for k in TOTALS[:3]}}
        out.update({k: float(sums[k]) for k in TOTALS[3:]})
        price = prices.get(name)
        if price:
            out["cost"] = (out["prompt_tokens"] * price[0] + out["completion_tokens"] * price[1]) / 1e6
            out["currency"] = price[2]
        per_teacher[name] = out
    prompt_tokens = sum(t["prompt_tokens"] for t in per_teacher.values())
    completion_tokens = sum(t["completion_tokens"] for t in per_teacher.values())
    out = {
        "per_teacher": per_teacher,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "rows_taught": rows_taught,
    }
    costs = [d["cost"] for d in per_teacher.values() if "cost" in d]
    if costs:
        out["cost"] = float(sum(costs))
    return out


def band_accounting(bands: np.ndarray, tokens: np.ndarray, taught: list[str]) -> dict:
    """Teacher tokens per band of the training pool, and the saving of teaching only ``taught``.

    ``bands``: the band of every training row; ``tokens``: each row's teacher tokens (prompt and
    completion over all attempts, summed over the teachers that answered it, from this run or any
    earlier one sharing the cache), NaN where no teacher has answered it. A band's tokens are measured
    for the rows the teacher has answered; the rest are estimated from that band's measured mean per row
    (or, for a band never taught, from the mean of the measured rows of all bands) and labelled so. The
    saving compares the taught bands' tokens with all bands' tokens and says whether both are measured."""
    bands, tokens = np.asarray(bands), np.asarray(tokens, dtype=np.float64)
    measured = ~np.isnan(tokens)
    overall_mean = float(tokens[measured].mean()) if measured.any() else None
    per_band, bases = {}, []
    for band in BANDS:
        mine = bands == band
        got = tokens[mine & measured]
        entry = {"rows": int(mine.sum()), "taught": band in taught, "measured_rows": int(len(got))}
        entry["measured_tokens"] = int(got.sum())
        missing = int(mine.sum()) - len(got)
        mean, source = (
            (float(got.mean()), "this band's measured mean per row")
            if len(got)
            else (overall_mean, "the measured mean per row of all bands")
        )
        entry["estimated_rows"] = int(missing)
        entry["estimated_tokens"] = float(missing * mean) if missing and mean is not None else 0.0
        if missing and mean is None:
            entry["basis"] = "unknown: no row of any band was measured"
        elif missing:
            entry["basis"] = f"measured for {len(got)} rows, estimated for {missing} from {source}"
        else:
            entry["basis"] = "measured"
        entry["tokens"] = entry["measured_tokens"] + entry["estimated_tokens"]
        per_band[band] = entry
        bases.append(entry["basis"])
    exact = all(b == "measured" for b in bases)
    out = {"per_band": per_band, "saving": _saving(per_band, taught, exact)}
    if list(taught) != ["hard"]:
        # Every band taught (distill_all / random_split in the run): the saving above is 0 by
        # construction; the method's own saving, teaching the hard band only, is measured here.
        out["hard_only_saving"] = _saving(per_band, ["hard"], exact)
    return out


def _saving(per_band: dict, taught: list[str], exact: bool) -> dict:
    """The teacher tokens of the ``taught`` bands against all bands."""
    spent_taught = sum(per_band[b]["tokens"] for b in BANDS if b in taught)
    every = sum(per_band[b]["tokens"] for b in BANDS)
    return {
        "taught_bands_tokens": spent_taught,
        "all_bands_tokens": every,
        "saving_pct": 100.0 * (1 - spent_taught / every) if every else None,
        "basis": "measured" if exact else "estimate",
        "label": (
            "measured: teacher tokens of the taught bands vs all bands, every row answered by the teacher"
            if exact
            else "estimate: some rows were not taught; their tokens are extrapolated per band (see per_band.basis)"
        ),
    }
