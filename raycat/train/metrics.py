"""A training phase's ``metrics.json``: what the driver knows before the fit (rows, tokens, steps) joined
with what the worker loop measured (losses, step times, start-up). Pure: the driver builds the first
half, rank 0 writes the whole at the end of the phase (phases of one worker group end inside one fit)."""

from __future__ import annotations


def phase_info(phase, stats: dict, phase_hash: str, total: int, ckpts: str) -> dict:
    """The driver's half: the phase's example counts (``stats``, from the worker that prepared them), the
    planned steps, the checkpoint dir."""
    return {
        "phase": phase.name,
        "target": phase.target,
        "bands": list(phase.bands),
        "hash": phase_hash,
        "rows": stats["rows"],
        "examples": stats["examples"],
        "repeated_rows_for_equal_shards": stats["repeated"],
        "truncated": stats["truncated"],
        "tokens": stats["tokens"],
        "target_tokens": stats["target_tokens"],
        "total_steps": total,
        "checkpoints": ckpts,
    }


def step_seconds(entry: dict) -> float:
    """A history entry's step time (recomputed for entries logged before ``step_s`` was recorded)."""
    if "step_s" in entry:
        return entry["step_s"]
    return entry["tokens"] / entry["tokens_per_s"] if entry["tokens_per_s"] > 0 else 0.0


def startup(timing: dict | None, started: float, wall_s: float, hist: list, resumed: int | None) -> dict | None:
    """Where a phase's wall time went besides its steps (the last attempt, if it was resumed): worker
    group start (Ray Train placing the workers and the process group; 0 for a phase that followed
    another in the same group), model load + DeepSpeed init, the first step (lazy allocation), and what
    followed the last step (final checkpoint, export). Times are wall clocks of the driver and the
    workers: on one machine exact, on a cluster as close as the nodes' clocks."""
    if not timing or timing.get("first_step_done") is None:
        return None
    hist = [h for h in hist if h["step"] > (resumed or 0)]  # this attempt's steps
    steps_after_first = sum(step_seconds(h) for h in hist[1:])
    first_done = timing["first_step_done"]
    return {
        "worker_group_s": round(timing["entered"] - started, 2),
        "model_and_deepspeed_s": round(timing["ready"] - timing["entered"], 2),
        "first_step_s": round(first_done - timing["ready"], 2),
        "after_last_step_s": round(started + wall_s - first_done - steps_after_first, 2),
    }


def phase_metrics(info: dict, state: dict, wall_s: float, started: float) -> dict:
    """``info`` (``phase_info``) joined with the loop's ``state``: losses per step and epoch, tokens/s,
    padding waste, the data feed's share, start-up. ``started``: when this phase's attempt began (the
    fit's start for a group's first phase, the previous phase's end for the others)."""
    hist = state["history"]
    epochs: dict[int, list[float]] = {}
    for h in hist:
        epochs.setdefault(h["epoch"], []).append(h["loss"])
    padded = state["padded_tokens"]
    step_s = sum(map(step_seconds, hist))
    later_s = sum(map(step_seconds, hist[1:]))
    return {
        **info,
        "steps": len(hist),
        "first_loss": hist[0]["loss"] if hist else None,
        "last_loss": hist[-1]["loss"] if hist else None,
        "per_epoch": [{"epoch": e, "mean_loss": sum(v) / len(v), "steps": len(v)} for e, v in sorted(epochs.items())],
        "mean_tokens_per_s": sum(h["tokens"] for h in hist) / step_s if hist and step_s > 0 else None,
        "padding_waste": 1 - state["real_tokens"] / padded if padded else None,
        # Share of step time spent waiting for micro-batches from the Ray Data shard, after the first
        # step (whose wait for the dataset to start executing is start-up, see "startup").
        "data_feed_share": sum(h.get("fetch_s", 0.0) for h in hist[1:]) / later_s
        if len(hist) > 1 and later_s > 0
        else None,
        "resumed_from_step": state.get("resumed_from_step"),
        "init_fingerprint": state.get("init_fingerprint"),
        "wall_s": round(wall_s, 2),
        "startup": startup(state.get("timing"), started, wall_s, hist, state.get("resumed_from_step")),
        # Epoch seconds on rank 0's clock: where the steady state (the steps after the first) began.
        "first_step_done_at": (state.get("timing") or {}).get("first_step_done"),
        "history": hist,
    }
