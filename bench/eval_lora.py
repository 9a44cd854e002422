"""Eval of three LoRA phases of one base: one engine serving all three (vLLM multi-LoRA, ``eval.max_loras``)
vs an engine per phase, against evaluating one phase alone.

    python bench/eval_lora.py                    # SmolLM2-135M base, 3 adapters, 96 held-out rows, CPU
    python bench/eval_lora.py --rows 200 --max-tokens-cot 256

The adapters are real PEFT LoRA adapters (rank 16 on q/k/v/o) with random B weights (small: the model
still writes text and stops on its own sometimes), as training would leave them; two phases answer with
``[[X]]`` (``max_tokens_answer``) and one writes a chain of thought (``max_tokens_cot``), as sft_all/phase1,
complexity_aware/phase1 and complexity_aware/phase2 do. Each timing is the eval pipeline's wall (Ray
Data + vLLM actors, engine start included: what a user pays per model), on a local Ray started once:

- one: complexity_aware/phase2 alone (the CoT phase: the longest of the three);
- separate: the three phases one engine after another (``eval.max_loras: 0``, before);
- shared: the three in one engine (``eval.max_loras: 4``, the default).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def make_adapter(base: str, out: Path, seed: int, scale: float) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="registry:smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--max-tokens-answer", type=int, default=16)
    parser.add_argument("--max-tokens-cot", type=int, default=128)
    parser.add_argument("--scale", type=float, default=0.02, help="std of the adapters' random B weights")
    args = parser.parse_args()

    import pandas as pd

    from raycat.config import validate_config
    from raycat.data.synthetic import generate_arithmetic
    from raycat.evaluate.stage import engine_groups, make_plan, read_parts, run_pipeline
    from raycat.ray_env import ray_session
    from raycat.storage import models, rowkey

    base = models.resolve(args.model)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [make_adapter(base, Path(tmp) / f"adapter{i}", i, args.scale) for i in range(3)]
        cfg = validate_config(
            {
                "run_dir": tmp,
                "data": {"source": "synthetic"},
                "score": {"student": {"path": base}},
                "eval": {
                    "max_tokens_answer": args.max_tokens_answer,
                    "max_tokens_cot": args.max_tokens_cot,
                    "max_model_len": 1024,
                    "engine": {"kv_cache_gib": 1, "cpus_per_engine": max(threads - 0.5, 1)},
                },
                "ray": {"num_cpus": max(threads, 2)},
            }
        )
        names = [
            ("sft_all/phase1", "answer"),
            ("complexity_aware/phase1", "answer"),
            ("complexity_aware/phase2", "cot"),
        ]
        plans = [
            make_plan(cfg, name, base, adapter, kind, f"bench-{name}", None)
            for (name, kind), adapter in zip(names, adapters, strict=True)
        ]
        questions = pd.DataFrame(generate_arithmetic(args.rows, 3, 4, 0)).assign(band="hard")
        rows = rowkey.add(questions)

        def timed(groups, label: str) -> tuple[float, int]:
            parts_root = Path(tmp) / label
            began = time.perf_counter()
            for group in groups:
                parts = tuple(str(parts_root / p.name.replace("/", "__")) for p in group)
                run_pipeline(cfg, group, rows, parts, on_rows=lambda n: None)
            wall = time.perf_counter() - began
            tokens = sum(
                int(read_parts(str(parts_root / p.name.replace("/", "__")))["completion_tokens"].sum())
                for group in groups
                for p in group
            )
            return wall, tokens

        with ray_session(cfg.ray):
            one = timed([(plans[2],)], "one")
            separate = timed(engine_groups(plans, 0), "separate")
            shared = timed(engine_groups(plans, 4), "shared")
    print(
        f"\nmodel {args.model}, {args.rows} rows, 3 LoRA phases (2 answer x {args.max_tokens_answer} tokens, 1 CoT x "
        f"{args.max_tokens_cot}), {threads} threads, wall incl. engine start"
    )
    for label, (wall, tokens) in (("one phase", one), ("3, an engine each", separate), ("3, one engine", shared)):
        print(f"{label:<20} {wall:7.1f} s  {tokens:7d} completion tokens  {wall / one[0]:.2f}x one phase")
    print("goal: 3 phases <= 1.5x one phase")


if __name__ == "__main__":
    main()
