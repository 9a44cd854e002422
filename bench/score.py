"""Scoring throughput: raycat (Ray Data + vLLM) vs the paper's approach vs a batched forward pass.

    python bench/score.py                                   # SmolLM2-135M, 384 synthetic questions
    python bench/score.py --model Qwen/Qwen2.5-3B-Instruct --n 2000 --device gpu

All methods score the same rendered prompts (the student's chat template) in one process run:
  reference  transformers generate(max_new_tokens=1, output_scores=True), batch size 1, full-vocab
             entropy from the scores: what the paper's code does;
  batched    one transformers forward pass per batch of 16 (left padding), last-position logits;
  vllm       raycat's engine driven directly (options mode), no Ray;
  vllm-full  the same engine in `full` mode: exact full-vocabulary entropy from the in-sampler
             processor (raycat.first_token), on every row;
  raycat     the whole `raycat score` pipeline: Ray Data, render actor, vLLM actor, Parquet parts.
Model load / engine start is timed separately from scoring. Prefill FLOP/s = (2 x non-embedding
parameters x prompt tokens + 2 x LM-head parameters per prompt) / scoring seconds, against the matmul
peak in the engine's dtype measured in the same run with the same thread count (warmed up, best of
several repeats). Every method uses `--threads` (default: all CPUs, as `raycat score` gives an engine
that owns the machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def matmul_peak(dtype, n: int = 2048, reps: int = 5, repeats: int = 7) -> float:
    """Best FLOP/s of an n x n matmul in ``dtype`` with the process's torch threads (warmed up)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


DIRECT_ONE_ROW = """
import sys
from transformers import AutoTokenizer
from raycat.data.prompts import label_tokens, messages_for, render_ids
from raycat.engines.base import ScoreRequest
from raycat.engines.vllm_engine import VLLMEngine
path, dtype, device = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(path)
prompt = render_ids(tok, messages_for("2 + 2 = ?", ["3", "4", "5", "6"], "math", "letters"))
# As the pipeline's options-mode engine: no full-vocabulary logprobs.
engine = VLLMEngine(path, dtype=dtype, device=device, max_model_len=1024, kv_cache_gib=1, need_full=False)
engine.score([ScoreRequest(prompt, label_tokens(tok, 4, "letters").groups(4, "letters"))], "options", 20, 1)
engine.close()
"""


def direct_one_row(path: str, dtype: str, device: str) -> float:
    """Seconds for a fresh Python process to import, start the engine and score one row (what the
    pipeline's engine actor does, without Ray)."""
    import subprocess

    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", DIRECT_ONE_ROW, path, dtype, device], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the direct engine's process failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="registry:smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=384, help="questions (synthetic arithmetic, 4 options)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads for every method")
    parser.add_argument("--dtype", default="auto", help="engine dtype ('auto' = what raycat picks on this machine)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow batch-size-1 baseline")
    parser.add_argument("--json", help="append raycat's measured prefill rate to this file (for study scaling plans)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycat import entropy as H
    from raycat.config import validate_config
    from raycat.data.prompts import label_tokens, messages_for, render_ids
    from raycat.data.synthetic import generate_arithmetic
    from raycat.engines.base import ScoreRequest, resolve_dtype
    from raycat.engines.vllm_engine import VLLMEngine
    from raycat.storage import models

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    questions = generate_arithmetic(args.n, 3, 4, 0)
    prompts = [render_ids(tok, messages_for(q["question"], q["options"], q["category"], "letters")) for q in questions]
    groups = label_tokens(tok, 4, "letters").groups(4, "letters")
    n_tokens = sum(map(len, prompts))
    dev = "cuda" if args.device == "gpu" else "cpu"
    dtype_name = resolve_dtype(args.dtype, args.device)
    dtype = getattr(torch, dtype_name)
    results: dict[str, dict] = {}

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    load_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == emb.data_ptr()
    n_body = n_params - emb.numel() - (0 if tied else head.numel())
    flops_per_run = 2 * n_body * n_tokens + 2 * head.numel() * len(prompts)

    if not args.skip_reference:
        t = time.perf_counter()
        ref = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=dev)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=1,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
                ref.append(H.entropy_full(H.log_softmax(out.scores[-1][0].double().cpu().numpy())))
        results["reference"] = {"score_s": time.perf_counter() - t, "start_s": load_s}

    t = time.perf_counter()
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=dev)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=dev)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].double().cpu().numpy()
            for row in logits:
                H.entropy_options(H.group_logprobs(dict(enumerate(H.log_softmax(row))), groups))
    results["batched"] = {"score_s": time.perf_counter() - t, "start_s": load_s}
    del model

    t = time.perf_counter()
    engine = VLLMEngine(path, dtype=dtype_name, device=args.device, max_model_len=1024, kv_cache_gib=1)
    start = time.perf_counter() - t
    requests = [ScoreRequest(p, groups) for p in prompts]
    # Warm-up: the first batch pays one-off allocations.
    engine.score(requests[:8], "options", 20, 1)
    for mode in ("options", "full", "options", "full"):  # interleaved, best of two each
        t = time.perf_counter()
        got = engine.score(requests, mode, 20, 1)
        name = "vllm" if mode == "options" else "vllm-full"
        took = time.perf_counter() - t
        if name not in results or took < results[name]["score_s"]:
            results[name] = {"score_s": took, "start_s": start}
        if mode == "full" and "reference" in results:
            dev_nats = max(abs(g.entropy_full - r) for g, r in zip(got, ref, strict=True))
    engine.close()

    from raycat.engines.actor_pool import Pool
    from raycat.ray_env import ray_session
    from raycat.score.stage import make_plan, run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate_config(
            {
                "run_dir": tmp,
                "data": {"source": "synthetic"},
                "score": {
                    "student": {"path": path, "dtype": dtype_name, "max_model_len": 1024},
                    "engine": {
                        "device": args.device,
                        # Blocks of 4 batches: several blocks to time the steady state.
                        "batch_size": 16,
                        "kv_cache_gib": 1,
                        # the engine computes with ceil(cpus) threads; the rest is left to the light tasks
                        "cpus_per_engine": max(args.threads - 0.5, 1),
                    },
                },
                "ray": {"num_cpus": max(os.cpu_count(), args.threads)},
            }
        )
        import pandas as pd

        from raycat.storage import rowkey

        # The stage's own plan (label tokens, cache key, engine settings), so the bench follows it.
        plan = make_plan(cfg, tok, 4, frozenset())
        # The stage keys its cache on (id, row_hash).
        rows = rowkey.add(pd.DataFrame(questions))
        # Start-up: one row scored from nothing, directly (before Ray starts) and through the whole
        # pipeline (Ray already up, as on a cluster).
        results_start = {"direct_1row_s": direct_one_row(path, dtype_name, args.device)}
        with ray_session(cfg.ray):
            t = time.perf_counter()
            run_pipeline(plan, Pool.of(cfg.score.engine), rows.iloc[:1], str(Path(tmp) / "parts-1"))
            results_start["raycat_1row_s"] = time.perf_counter() - t
            t = time.perf_counter()
            done: list[tuple[float, int]] = []  # (time, rows) per written block
            run_pipeline(
                plan,
                Pool.of(cfg.score.engine),
                rows,
                str(Path(tmp) / "parts"),
                on_rows=lambda n: done.append((time.perf_counter(), n)),
            )
        wall = time.perf_counter() - t
        # Steady state: rows after the first block over the time from the first block to the last, so the
        # engine start inside the actor (not separable from outside) is left out.
        steady = sum(n for _, n in done[1:]) / max(done[-1][0] - done[0][0], 1e-9)
        results["raycat"] = {"score_s": args.n / steady, "start_s": done[0][0] - t, "wall_s": wall, **results_start}

    # What the matmul peak and the in-process methods ran with.
    used = torch.get_num_threads()
    peak = matmul_peak(dtype)
    base = results.get("reference", results["batched"])["score_s"]
    print(
        f"\nmodel {args.model} ({n_params / 1e6:.1f}M params, {n_body / 1e6:.1f}M non-embedding), {args.n} prompts, "
        f"{n_tokens} prompt tokens, device {args.device}, dtype {dtype_name}, threads {used}"
    )
    print(f"{dtype_name} matmul peak ({used} thread(s), 2048^2, best of 7): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{'method':<10} {'start s':>8} {'score s':>8} {'rows/s':>8} {'x ref':>7} {'prefill GFLOP/s':>16} {'% peak':>7}"
    )
    for name, r in results.items():
        flops = flops_per_run / r["score_s"]
        print(
            f"{name:<10} {r['start_s']:8.1f} {r['score_s']:8.2f} {args.n / r['score_s']:8.1f} "
            f"{base / r['score_s']:7.2f} {flops / 1e9:16.1f} {100 * flops / peak:7.1f}"
        )
    print(
        "full-vocab entropy (in-sampler) / options mode: "
        f"{results['vllm-full']['score_s'] / results['vllm']['score_s']:.2f}x (goal <= 1.5x)"
        + (f"; max |H_full - reference| in {dtype_name} = {dev_nats:.1e} nats" if "reference" in results else "")
    )
    if "raycat" in results:
        print(
            f"raycat pipeline wall incl. engine start: {results['raycat']['wall_s']:.1f} s; steady-state "
            f"Ray Data overhead vs direct vLLM: {results['raycat']['score_s'] / results['vllm']['score_s']:.2f}x"
        )
        r = results["raycat"]
        print(
            f"engine start-up, one row scored from nothing: raycat pipeline {r['raycat_1row_s']:.1f} s "
            "(Ray already up) "
            f"vs a direct engine in a fresh process {r['direct_1row_s']:.1f} s = "
            f"{r['raycat_1row_s'] / r['direct_1row_s']:.2f}x (goal <= 1.5x)"
        )
    if args.json and "raycat" in results:
        from raycat.study import costs

        rec = costs.record(
            bench="bench/score.py",
            kind="prefill",
            model=args.model,
            params=n_params,
            device=args.device,
            devices=1 if args.device == "gpu" else cfg.score.engine.cpus_per_engine,
            tokens=n_tokens,
            seconds=results["raycat"]["score_s"],
            dtype=dtype_name,
            basis="raycat score pipeline, steady state",
        )
        costs.append_records(args.json, [rec])
        print(f"wrote {args.json}: {rec['tokens_per_s_per_device']:.1f} prefill tok/s per device")
    if args.device == "gpu":
        print(f"GPU goal: raycat >= 20x the batch-1 reference (here {base / results['raycat']['score_s']:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
