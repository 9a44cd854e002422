"""Teacher throughput with mixed completion lengths: the `raycat teach` Ray Data stage vs the same vLLM
engine driven directly, with the engine streaming (``engine.batches_in_flight``) and one batch at a time.

    python bench/teach.py                                  # SmolLM2-135M as a stand-in teacher, CPU
    python bench/teach.py --model registry:qwen2.5-coder-1.5b-instruct --n 16 --max-tokens 256

Same model, dtype ('auto', as raycat picks), threads (all CPUs) and greedy sampling in one run. The
model writes to its own stop (EOS) up to ``--max-tokens``, so completion lengths spread as a teacher's
do (the run prints their percentiles). Rates are completion tokens over generation time, the last
request's tail included in both:

- direct: one ``generate`` call over all 2n prompts on a started engine (vLLM's continuous batching over
  every request: the limit on this machine).
- stage: the teach stage over the same 2n rows in engine batches of ``--batch-size``, with
  batches_in_flight 4 (the default: a batch's rows join the running ones) and 1 (one batch at a time:
  each batch waits for its longest completion). Its generation time is its wall minus the wall of the
  same stage over one row and one token (engine start, Ray Data, rendering, parts: what does not grow
  with the rows).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def direct_in_ray(path: str, dtype: str, device: str, prompts: list, sampling, cpus: float, threads: int) -> float:
    """Completion tokens/s of one ``generate`` over all prompts on a warmed engine, as the direct line, but
    in a Ray actor with the CPUs and OpenMP threads raycat's engine actor gets, under a local Ray as raycat
    starts it: what the stage could reach inside Ray on this machine."""
    import ray

    from raycat.config import RayConfig
    from raycat.ray_env import ray_session

    @ray.remote
    class Direct:
        def run(self) -> tuple[int, float]:
            from raycat.engines.base import Sampling
            from raycat.engines.vllm_engine import VLLMEngine

            engine = VLLMEngine(path, dtype=dtype, device=device, max_model_len=2048, kv_cache_gib=2, need_full=False)
            engine.generate(prompts[:4], Sampling(0.0, 1.0, 8, 0))
            t = time.perf_counter()
            gens = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - t
            engine.close()
            return sum(g.completion_tokens for g in gens), seconds

    with ray_session(RayConfig(num_cpus=max(threads, 2))):
        actor = Direct.options(num_cpus=cpus, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}}).remote()
        tokens, seconds = ray.get(actor.run.remote())
        ray.kill(actor)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="registry:smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[4, 1], help="batches_in_flight values to time")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--floors",
        action="store_true",
        help="also time the direct generate inside a Ray actor set up as raycat's engine actor (the ceiling "
        "for the stage inside Ray on this machine)",
    )
    parser.add_argument(
        "--json", help="append the teach stage's measured decode rate to this file (for study scaling plans)"
    )
    args = parser.parse_args()
    if args.floors and args.device != "cpu":
        parser.error("--floors sets its actor up as a CPU engine's (raycat's GPU actors get GPU bundles)")

    import numpy as np
    import pandas as pd
    import torch
    from cpu_use import CpuSampler
    from transformers import AutoTokenizer

    from raycat.config import validate_config
    from raycat.data.prompts import render_ids, teach_messages
    from raycat.data.synthetic import generate_arithmetic
    from raycat.engines.base import Sampling, resolve_dtype
    from raycat.engines.vllm_engine import VLLMEngine
    from raycat.ray_env import ray_session
    from raycat.storage import models, rowkey
    from raycat.teach.stage import make_plan, read_parts, run_pipeline

    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    questions = generate_arithmetic(2 * args.n, 3, 4, 0)
    prompts = [render_ids(tok, teach_messages(q["question"], q["options"], q["category"])) for q in questions]
    dtype = resolve_dtype("auto", args.device)
    threads = os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    sampling = Sampling(0.0, 1.0, args.max_tokens, 0)

    t = time.perf_counter()
    engine = VLLMEngine(path, dtype=dtype, device=args.device, max_model_len=2048, kv_cache_gib=2, need_full=False)
    start = time.perf_counter() - t
    # A started and warmed-up engine (the first call pays one-off allocations), all 2n prompts in one call.
    engine.generate(prompts[:4], Sampling(0.0, 1.0, 8, 0))
    t = time.perf_counter()
    gens = engine.generate(prompts, sampling)
    direct_s = time.perf_counter() - t
    direct_tokens = sum(g.completion_tokens for g in gens)
    lengths = np.array([g.completion_tokens for g in gens])
    engine.close()
    del engine

    def stage(n: int, in_flight: int, max_tokens: int) -> tuple[float, int, float, dict]:
        """(wall seconds incl. engine start, completion tokens, engine busy seconds, cores busy per process
        group over the wall) of the teach stage on the first n rows."""
        with tempfile.TemporaryDirectory() as tmp:
            teacher = {
                "model": {"path": path, "dtype": dtype, "max_model_len": 2048},
                "engine": {
                    "device": args.device,
                    "batch_size": args.batch_size,
                    "batches_in_flight": in_flight,
                    "kv_cache_gib": 2,
                    # ceil -> all threads; the light tasks fit beside.
                    "cpus_per_engine": max(threads - 0.5, 1),
                },
            }
            cfg = validate_config(
                {
                    "run_dir": tmp,
                    "data": {"source": "synthetic"},
                    "score": {"student": {"path": path}},
                    "teach": {"teachers": [teacher], "sampling": {"max_tokens": max_tokens}, "retries": 0},
                    "ray": {"num_cpus": max(threads, 2)},
                }
            )
            plan = make_plan(cfg, cfg.teach.teachers[0])
            cache = os.path.join(tmp, "cache")
            with CpuSampler() as cpu, ray_session(cfg.ray):
                t, t0 = time.perf_counter(), time.time()
                # The stage keys its cache on (id, row_hash).
                rows = rowkey.add(pd.DataFrame(questions[:n]))
                run_pipeline(cfg.teach.teachers[0], plan, rows, cache, on_rows=lambda n: None)
                wall = time.perf_counter() - t
                used, span = cpu.window(t0, time.time())
            done = read_parts(cache)
            # A row's engine seconds are its share of the engine steps it was in: they add up to the
            # time the engine spent stepping.
            busy = float(done["engine_seconds"].sum())
            return wall, int(done["completion_tokens"].sum()), busy, {k: v / span for k, v in used.items()}

    direct_rate = direct_tokens / direct_s
    print(
        f"\nmodel {args.model}, dtype {dtype}, {threads} threads, {2 * args.n} prompts, max_tokens "
        f"{args.max_tokens}, engine batches of {args.batch_size}"
    )
    print(
        f"completion tokens: p10 {np.percentile(lengths, 10):.0f}, median {np.median(lengths):.0f}, p90 "
        f"{np.percentile(lengths, 90):.0f}, max {lengths.max()} "
        f"({(lengths >= args.max_tokens).mean():.0%} at max_tokens)"
    )
    print(f"engine start (direct): {start:.1f} s")
    print(f"direct vLLM, one generate: {direct_tokens} tokens in {direct_s:.2f} s = {direct_rate:.1f} tok/s")
    fixed = stage(1, max(args.in_flight), 1)[0]
    print(f"raycat teach stage on 1 row and 1 token (engine start, Ray Data, parts): {fixed:.1f} s")
    measured = {}
    for in_flight in args.in_flight:
        wall, tokens, busy, cores = stage(2 * args.n, in_flight, args.max_tokens)
        seconds = max(wall - fixed, 1e-9)
        measured[in_flight] = (tokens / seconds, tokens, seconds)
        print(
            f"raycat teach, batches_in_flight {in_flight}: {tokens} tokens in {wall:.1f} - {fixed:.1f} s = "
            f"{tokens / seconds:.1f} tok/s = {tokens / seconds / direct_rate:.2f}x direct"
        )
        # Where the gap to direct is: the engine idle between steps (waiting for rows), or stepping
        # slower than alone (cores taken by Ray's other processes, threads of the actor).
        print(
            f"  engine stepping {busy:.1f} s of the {seconds:.1f} s ({tokens / busy:.1f} tok/s while stepping = "
            f"{tokens / busy / direct_rate:.2f}x direct); cores busy over the stage's wall: "
            + ", ".join(f"{g} {c:.2f}" for g, c in sorted(cores.items(), key=lambda x: -x[1])[:5])
        )
    if args.floors:
        in_ray_rate = direct_in_ray(path, dtype, args.device, prompts, sampling, max(threads - 0.5, 1), threads)
        best_rate = max(measured.values())[0]
        print(
            f"direct generate in a Ray actor ({max(threads - 0.5, 1)} CPUs, OMP threads {threads}, a local Ray as "
            f"raycat starts it): {in_ray_rate:.1f} tok/s = {in_ray_rate / direct_rate:.2f}x direct; raycat's "
            f"best = {best_rate / in_ray_rate:.2f}x of it"
        )
    if len(measured) > 1:
        best, worst = max(measured), min(measured)
        print(
            f"batches_in_flight {best} vs {worst}: {measured[best][0] / measured[worst][0]:.2f}x the tokens/s "
            "(goal: the stage >= 0.9x direct)"
        )

    if args.json:
        from transformers import AutoConfig, AutoModelForCausalLM

        from raycat.study import costs

        with torch.device("meta"):
            n_params = sum(
                p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters()
            )
        in_flight = max(measured)
        r, tokens, seconds = measured[in_flight]
        rec = costs.record(
            bench="bench/teach.py",
            kind="decode",
            model=args.model,
            params=n_params,
            device=args.device,
            devices=1 if args.device == "gpu" else max(threads - 0.5, 1),
            tokens=tokens,
            seconds=seconds,
            dtype=dtype,
            basis=f"raycat teach stage, completion tokens over its wall less its fixed cost (max_tokens "
            f"{args.max_tokens}, batches_in_flight {in_flight})",
        )
        costs.append_records(args.json, [rec])
        print(f"wrote {args.json}: {rec['tokens_per_s_per_device']:.1f} decode tok/s per device")


if __name__ == "__main__":
    main()
