"""Pure core of the teach stage: the attempt loop, the final-status policy, the accounting.

No Ray here; the engine is passed in, so the same loop runs inside a Ray Data actor or a unit test.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pandas as pd

from raycat.data.answers import extract_answer
from raycat.engines.base import Generator, Sampling

# Per attempt: verified | wrong | truncated | no_answer (best first). Per row before any attempt: failed
# (with a reason). "truncated": cut off by sampling.max_tokens; never verified, whatever it contains, since
# a CoT that stops mid-sentence is not a training target even when an answer appeared before the cut.
_RANK = {"verified": 0, "wrong": 1, "truncated": 2, "no_answer": 3}


def judge(g, row: dict) -> tuple[str, str | None]:
    """(attempt status, extracted answer) of one generation for ``row`` (n_options, gold)."""
    extracted = extract_answer(g.answer_text, int(row["n_options"]))
    if g.finish_reason == "length":
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
    the row is "failed" with the error as its reason.

    The row keeps its best attempt (verified > wrong > no answer) and, among equals, the FIRST one: for
    ``teach.on_wrong: keep`` the kept wrong response is the earliest, sampled at the schedule's first
    (normally lowest) temperature, not the last and most random retry.
    """
    res = [
        {
            "response": None,
            "extracted": None,
            "status": "failed" if r["skip_reason"] else "no_answer",
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
        t = time.perf_counter()
        flat = engine.generate([rows[i]["prompt"] for i in pending], sampling)
        share = (time.perf_counter() - t) / len(pending)
        n = sampling.n
        stopped = set()
        for k, i in enumerate(pending):
            r = res[i]
            samples = flat[k * n : (k + 1) * n]
            g = _best(samples, rows[i])
            if g.error is not None:
                r["reason"] = g.error
                if r["attempts"] == 0:
                    r["status"] = "failed"
                stopped.add(i)
                continue
            status, extracted = judge(g, rows[i])
            if r["attempts"] == 0 or _RANK[status] < _RANK[r["status"]]:  # strictly better: earlier wins ties
                r.update(response=g.text, extracted=extracted, finish_reason=g.finish_reason, status=status)
            r["attempts"] += 1
            r["prompt_tokens"] += sum(s.prompt_tokens for s in samples)
            r["completion_tokens"] += sum(s.completion_tokens for s in samples)
            r["engine_seconds"] += share
        pending = [i for i in pending if res[i]["status"] != "verified" and i not in stopped]
    return res


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
    what = {
        "wrong": "wrong answer",
        "truncated": "cut off at teach.sampling.max_tokens (raise it)",
    }.get(attempt_status, "no valid [[answer]] (none, an invalid one, or a hedge)")
    if on_wrong == "keep" and attempt_status == "wrong":  # the first wrong attempt: teach_rows keeps that one
        return "kept_wrong", response, f"{what}; kept (teach.on_wrong=keep)"
    if on_wrong == "fallback_to_answer":
        return "fallback_to_answer", f"[[{gold}]]", f"{what}; plain answer target (teach.on_wrong)"
    return f"dropped_{attempt_status}", None, f"{what} after all attempts (teach.on_wrong={on_wrong})"


def accounting(rows: pd.DataFrame, prices: dict[str, tuple[float, float, str] | None]) -> dict:
    """Token, time and cost totals of ``rows`` (every teacher's result for the rows taught)."""
    per_teacher = {}
    for name, g in rows.groupby("teacher"):
        d = {
            "rows": int(len(g)),
            "attempts": int(g["attempts"].sum()),
            "prompt_tokens": int(g["prompt_tokens"].sum()),
            "completion_tokens": int(g["completion_tokens"].sum()),
            "engine_seconds": float(g["engine_seconds"].sum()),
            "gpu_seconds": float(g["gpu_seconds"].sum()),
        }
        price = prices.get(name)
        if price:
            d["cost"] = (d["prompt_tokens"] * price[0] + d["completion_tokens"] * price[1]) / 1e6
            d["currency"] = price[2]
        per_teacher[str(name)] = d
    total_p, total_c = int(rows["prompt_tokens"].sum()), int(rows["completion_tokens"].sum())
    out = {
        "per_teacher": per_teacher,
        "prompt_tokens": total_p,
        "completion_tokens": total_c,
        "total_tokens": total_p + total_c,
        "rows_taught": int(rows["_key"].nunique()) if "_key" in rows else int(len(rows)),
    }
    costs = [d["cost"] for d in per_teacher.values() if "cost" in d]
    if costs:
        out["cost"] = float(sum(costs))
    return out


BANDS = ("easy", "medium", "hard")


def band_accounting(pool: pd.DataFrame, spent: pd.DataFrame, taught: list[str]) -> dict:
    """Teacher tokens per band of the training pool, and the saving of teaching only ``taught``.

    ``pool``: ``_key, band`` of every training row; ``spent``: every teacher result found for pool rows
    (``_key``, prompt and completion tokens over all attempts), from this run or any earlier one sharing
    the cache. A band's tokens are measured for the rows the teacher has answered; the rest are
    estimated from that band's measured mean per row (or, for a band never taught, from the mean of the
    measured rows of all bands) and labelled so. The saving compares the taught bands' tokens with all
    bands' tokens and says whether both are measured."""
    tokens = (spent["prompt_tokens"] + spent["completion_tokens"]).groupby(spent["_key"]).sum()
    measured_all = tokens[tokens.index.isin(set(pool["_key"]))]
    overall_mean = float(measured_all.mean()) if len(measured_all) else None
    per_band, bases = {}, []
    for band in BANDS:
        keys = pool.loc[pool["band"] == band, "_key"]
        got = tokens.reindex(keys).dropna()
        d = {"rows": int(len(keys)), "taught": band in taught, "measured_rows": int(len(got))}
        d["measured_tokens"] = int(got.sum())
        missing = len(keys) - len(got)
        mean, source = (
            (float(got.mean()), "this band's measured mean per row")
            if len(got)
            else (overall_mean, "the measured mean per row of all bands")
        )
        d["estimated_rows"] = int(missing)
        d["estimated_tokens"] = float(missing * mean) if missing and mean is not None else 0.0
        if missing and mean is None:
            d["basis"] = "unknown: no row of any band was measured"
        elif missing:
            d["basis"] = f"measured for {len(got)} rows, estimated for {missing} from {source}"
        else:
            d["basis"] = "measured"
        d["tokens"] = d["measured_tokens"] + d["estimated_tokens"]
        per_band[band] = d
        bases.append(d["basis"])
    spent_taught = sum(per_band[b]["tokens"] for b in BANDS if b in taught)
    every = sum(per_band[b]["tokens"] for b in BANDS)
    exact = all(b == "measured" for b in bases)
    saving = {
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
    return {"per_band": per_band, "saving": saving}
