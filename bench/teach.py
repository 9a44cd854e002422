"""Teacher throughput: the `raycat teach` Ray Data stage vs the same vLLM engine driven directly.

    python bench/teach.py                                  # SmolLM2-135M as a stand-in teacher, CPU
    python bench/teach.py --model registry:qwen2.5-coder-1.5b-instruct --n 16 --max-tokens 256

Same model, prompts and greedy sampling in one run, so both paths generate the same tokens. Engine
start is timed separately (measured on the direct path) and subtracted from the pipeline's wall time;
the ratio is the Ray Data overhead on completion tokens/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="registry:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = ap.parse_args()

    import pandas as pd
    from transformers import AutoTokenizer

    from raycat import models, rowkey
    from raycat.config import validate_config
    from raycat.engine import Sampling, VLLMEngine
    from raycat.prompts import render_ids, teach_messages
    from raycat.ray_env import ray_session
    from raycat.synthetic import generate_arithmetic
    from raycat.teach import read_cache, run_teacher, teacher_plan

    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    qs = generate_arithmetic(args.n, 3, 4, 0)
    prompts = [render_ids(tok, teach_messages(q["question"], q["options"], q["category"])) for q in qs]
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    sampling = Sampling(0.0, 1.0, args.max_tokens, 0)

    t = time.perf_counter()
    eng = VLLMEngine(path, dtype=dtype, device=args.device, max_model_len=2048, kv_cache_gib=2, need_full=False)
    start = time.perf_counter() - t
    t = time.perf_counter()
    gens = eng.generate(prompts, sampling)
    direct_s = time.perf_counter() - t
    direct_tokens = sum(g.completion_tokens for g in gens)
    eng.close()
    del eng

    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate_config(
            {
                "run_dir": tmp,
                "data": {"source": "synthetic"},
                "score": {"student": {"path": path}},
                "teach": {
                    "teachers": [
                        {
                            "model": {"path": path, "dtype": dtype, "max_model_len": 2048},
                            "engine": {"device": args.device, "batch_size": args.n, "kv_cache_gib": 2},
                        }
                    ],
                    "sampling": {"max_tokens": args.max_tokens},
                    "retries": 0,
                },
                "ray": {"num_cpus": os.cpu_count()},
            }
        )
        plan = teacher_plan(cfg, cfg.teach.teachers[0])
        cache = os.path.join(tmp, "cache")
        with ray_session(cfg.ray):
            t = time.perf_counter()
            rows = rowkey.add(pd.DataFrame(qs))  # the stage keys its cache on (id, row_hash)
            run_teacher(cfg.teach.teachers[0], plan, rows, cache, on_rows=lambda n: None)
            wall = time.perf_counter() - t
        ray_tokens = int(read_cache(cache)["completion_tokens"].sum())
    ray_s = max(wall - start, 1e-9)
    print(f"\nmodel {args.model}, {args.n} prompts, max_tokens {args.max_tokens}, device {args.device}")
    print(f"engine start (direct): {start:.1f} s; pipeline wall incl. its engine start: {wall:.1f} s")
    print(f"direct vLLM : {direct_tokens} completion tokens in {direct_s:.2f} s = {direct_tokens / direct_s:.1f} tok/s")
    print(f"raycat teach: {ray_tokens} completion tokens in ~{ray_s:.2f} s = {ray_tokens / ray_s:.1f} tok/s")
    print(f"Ray Data stage / direct throughput ratio: {(ray_tokens / ray_s) / (direct_tokens / direct_s):.2f}")


if __name__ == "__main__":
    main()
