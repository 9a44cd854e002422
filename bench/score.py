"""Scoring throughput: raycat (Ray Data + vLLM) vs the paper's approach vs a batched forward pass.

    python bench/score.py                                   # SmolLM2-135M, 96 synthetic questions
    python bench/score.py --model Qwen/Qwen2.5-3B-Instruct --n 2000 --device gpu

All methods score the same rendered prompts (the student's chat template) in one process run:
  reference  transformers generate(max_new_tokens=1, output_scores=True), batch size 1, full-vocab
             entropy from the scores: what the paper's code does;
  batched    one transformers forward pass per batch of 16 (left padding), last-position logits;
  vllm       raycat's engine driven directly (options mode), no Ray;
  raycat     the whole `raycat score` pipeline: Ray Data, render actor, vLLM actor, Parquet parts.
Model load / engine start is timed separately from scoring. Prefill FLOP/s = 2 x parameters x prompt
tokens / scoring seconds, against a float32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="registry:smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=96, help="questions (synthetic arithmetic, 4 options)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the transformers methods")
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow batch-size-1 baseline")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycat import entropy as H
    from raycat import models
    from raycat.config import validate_config
    from raycat.engine import ScoreRequest, VLLMEngine
    from raycat.prompts import label_tokens, messages_for, render_ids
    from raycat.synthetic import generate_arithmetic

    torch.set_num_threads(args.threads)
    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    qs = generate_arithmetic(args.n, 3, 4, 0)
    prompts = [render_ids(tok, messages_for(q["question"], q["options"], q["category"], "letters")) for q in qs]
    groups = label_tokens(tok, 4, "letters").groups(4, "letters")
    n_tokens = sum(map(len, prompts))
    dev = "cuda" if args.device == "gpu" else "cpu"
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    results: dict[str, dict] = {}

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    load_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())

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
                ref.append(H.entropy_full(H.log_softmax(out.scores[-1][0].float().cpu().numpy())))
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
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float().cpu().numpy()
            for row in logits:
                H.entropy_options(H.group_logprobs(dict(enumerate(H.log_softmax(row))), groups))
    results["batched"] = {"score_s": time.perf_counter() - t, "start_s": load_s}
    del model

    t = time.perf_counter()
    eng = VLLMEngine(
        path,
        dtype="float32" if dev == "cpu" else "bfloat16",
        device=args.device,
        max_model_len=1024,
        kv_cache_gib=1,
        need_full=False,
    )
    start = time.perf_counter() - t
    t = time.perf_counter()
    eng.score([ScoreRequest(p, groups) for p in prompts], "options", 20, 1)
    results["vllm"] = {"score_s": time.perf_counter() - t, "start_s": start}
    eng.close()

    from raycat.engine import engine_kwargs
    from raycat.engine_stage import Pool
    from raycat.ray_env import ray_session
    from raycat.score import ScorePlan, run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate_config(
            {
                "run_dir": tmp,
                "data": {"source": "synthetic"},
                "score": {
                    "student": {
                        "path": path,
                        "dtype": "float32" if dev == "cpu" else "bfloat16",
                        "max_model_len": 1024,
                    },
                    "engine": {"device": args.device, "batch_size": 32, "kv_cache_gib": 1},
                },
                "ray": {"num_cpus": os.cpu_count()},
            }
        )
        import pandas as pd

        from raycat import rowkey

        plan = ScorePlan(
            model_path=path,
            revision=None,
            trust_remote_code=False,
            preset="letters",
            system_prompt=None,
            labels=label_tokens(tok, 4, "letters"),
            template_hash="bench",
            cache_key="bench",
            sample_ids=frozenset(),
            max_prompt_tokens=1000,
            mode=cfg.score.entropy_mode,
            top_k=cfg.score.top_k,
            free_form_max_tokens=cfg.score.free_form_max_tokens,
            backend=cfg.score.engine.backend,
            engine_kwargs=engine_kwargs(cfg.score.student, cfg.score.engine),
        )
        t = time.perf_counter()
        with ray_session(cfg.ray):
            ray_init = time.perf_counter() - t
            t = time.perf_counter()
            rows = rowkey.add(pd.DataFrame(qs))  # the stage keys its cache on (id, row_hash)
            run_pipeline(plan, Pool.of(cfg.score.engine), rows, str(Path(tmp) / "parts"))
        wall = time.perf_counter() - t
        # Engine start inside the actor is not separable from outside; subtract the direct measurement.
        results["raycat"] = {"score_s": max(wall - start, 1e-9), "start_s": start + ray_init, "wall_s": wall}

    peak = matmul_peak(args.threads)
    base = results.get("reference", results["batched"])["score_s"]
    print(
        f"\nmodel {args.model} ({n_params / 1e6:.1f}M params), {args.n} prompts, {n_tokens} prompt tokens, "
        f"device {args.device}, torch threads {args.threads}"
    )
    print(f"float32 matmul peak ({args.threads} thread(s), 2048^2): {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{'method':<10} {'start s':>8} {'score s':>8} {'rows/s':>8} {'x ref':>7} {'prefill GFLOP/s':>16} {'% peak':>7}"
    )
    for name, r in results.items():
        flops = 2 * n_params * n_tokens / r["score_s"]
        print(
            f"{name:<10} {r['start_s']:8.1f} {r['score_s']:8.2f} {args.n / r['score_s']:8.1f} "
            f"{base / r['score_s']:7.2f} {flops / 1e9:16.1f} {100 * flops / peak:7.1f}"
        )
    if "raycat" in results:
        print(
            f"raycat pipeline wall incl. engine start: {results['raycat']['wall_s']:.1f} s; "
            f"Ray Data overhead vs direct vLLM: {results['raycat']['score_s'] / results['vllm']['score_s']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
