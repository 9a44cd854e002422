"""Training throughput: raycat's Ray Train + DeepSpeed path vs a bare transformers loop, 1 vs 2 workers.

    python bench/train.py                        # tiny real-shaped Llama, 96 examples, ZeRO-2, full FT
    python bench/train.py --steps 40 --hidden 512 --layers 4

Same model, same tokenized examples (raycat's encoder and label mask), same micro-batch, one torch
thread per worker, in one run:
  bare     single process: AdamW + forward/backward on the same micro-batches (packed, as raycat's
           default `train.batching`), no Ray, no DeepSpeed;
  raycat1  `raycat train` (recipe sft_all, one phase) with 1 Ray Train worker;
  raycat2  the same with 2 workers (data parallel: each step sees 2 micro-batches);
  padded1  raycat1 with `train.batching=padded` (right-padded micro-batches): the packing gain.
Tokens/s counts real (non-pad) tokens per optimizer step, measured inside the loop after the first
step, each step from the previous one's end (so fetching its batches from the Ray Data shard counts);
worker start-up is reported separately, split into its parts (metrics.json `startup`). Cores busy
per process group during those steps (bench/cpu_use.py) show what the workers share the CPUs with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bare_loop(model_dir: Path, encoded, micro_batch_size: int, steps: int) -> float:
    """Real tokens/s of one process: AdamW + forward/backward on the same packed micro-batches."""
    import floors

    rows = list(zip(encoded["input_ids"], encoded["labels"], strict=True))
    done = floors.ddp_steps(0, 1, str(model_dir), rows, micro_batch_size, steps)
    return done["tokens"] / done["seconds"]


def cores_busy(cpu, t0: float, t1: float) -> dict[str, float]:
    """Cores busy per process group between t0 and t1, as sampled (bench/cpu_use.py)."""
    used, span = cpu.window(t0, t1)
    return {k: v / span for k, v in used.items()} if span > 0 else {}


def print_floors(model_dir: Path, enc, work: Path, args, results: dict) -> None:
    """This machine's ceilings without raycat beside raycat's figures (bench/floors.py)."""
    import floors
    from cpu_use import CpuSampler

    ddp = {w: floors.ddp_rate(model_dir, enc, w, args.micro_batch_size, args.steps) for w in (1, 2)}
    in_ray = {}
    for w in (1, 2):
        with CpuSampler() as cpu:
            run = floors.ray_train_ddp_rate(model_dir, enc, w, args.micro_batch_size, args.steps)
        in_ray[w] = run["rate"]
    cores = cores_busy(cpu, run["t0"], run["t1"])
    data = work / "floor-examples.parquet"
    enc[["input_ids", "labels"]].to_parquet(data)
    group = floors.ray_train_start(str(data))
    imports, build = floors.fresh_start(model_dir)
    r1, r2 = results["raycat1"], results["raycat2"]
    s = r1["startup"]
    print("\nceilings on this machine, without raycat (bench/floors.py)")
    print(f"bare torch DDP (gloo), tokens/s: 1 process {ddp[1]:.0f}, 2 processes {ddp[2]:.0f}")
    print(f"the same DDP loop as Ray Train workers (no Ray Data, no DeepSpeed): {in_ray[1]:.0f}, {in_ray[2]:.0f}")
    top = sorted(cores.items(), key=lambda x: -x[1])
    print("  cores busy during its 2-worker steps: " + ", ".join(f"{g} {c:.2f}" for g, c in top[:6]))
    raycat = r2["tokens_per_s"] / r1["tokens_per_s"]
    print(
        f"1 -> 2: bare DDP {ddp[2] / ddp[1]:.2f}x   in Ray Train {in_ray[2] / in_ray[1]:.2f}x   raycat {raycat:.2f}x "
        f"(ZeRO-{args.zero_stage})   raycat 2 workers / bare DDP 2 = {r2['tokens_per_s'] / ddp[2]:.2f}x"
    )
    print(f"worker group: bare TorchTrainer (1 worker, a dataset) {group:.1f} s   raycat {s['worker_group_s']:.1f} s")
    print(
        f"model + DeepSpeed: a fresh process that has torch imports the rest in {imports:.1f} s, loads and "
        f"builds the engine in {build:.1f} s = {imports + build:.1f} s   raycat {s['model_and_deepspeed_s']:.1f} s"
    )
    floor = group + imports + build + s["first_step_s"]
    total = s["worker_group_s"] + s["model_and_deepspeed_s"] + s["first_step_s"]
    print(
        f"start-up to the first step's end: floors + raycat's first step ({s['first_step_s']:.1f} s) = {floor:.1f} s"
        f"   raycat {total:.1f} s (goal <= 10 s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96, help="training examples")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per method")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (per worker)")
    ap.add_argument(
        "--deepspeed",
        default="{}",
        help='train.deepspeed communication knobs as JSON, e.g. \'{"overlap_comm": true, "reduce_scatter": false}\'',
    )
    ap.add_argument(
        "--scaling-only", action="store_true", help="raycat1 and raycat2 only (no bare loop, no padded run)"
    )
    ap.add_argument(
        "--floors",
        action="store_true",
        help="also measure this machine's ceilings without raycat (bench/floors.py): bare torch DDP 1 vs 2 "
        "processes, Ray Train's own worker-group start, a fresh process's imports + model + DeepSpeed init",
    )
    ap.add_argument("--json", help="append raycat's measured 1-worker training rate to this file (scaling plans)")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "gpu"],
        help="gpu: raycat on one GPU in bf16 only, for a --json record (the comparisons are CPU-only)",
    )
    args = ap.parse_args()
    if args.floors and (args.device != "cpu" or args.accumulation != 1):
        ap.error("--floors compares CPU runs of one micro-batch per step (its loops do not accumulate)")
    comm = json.loads(args.deepspeed)

    from cpu_use import CpuSampler

    from raycat.config import validate_config
    from raycat.testing.tiny_models import build_tiny_model, build_tiny_train_run
    from raycat.train.batches import encode_rows, stop_token_ids
    from raycat.train.stage import run_train

    work = Path(tempfile.mkdtemp(prefix="raycat-bench-train-"))
    model_dir = build_tiny_model(work / "model")
    if (args.hidden, args.layers) != (256, 2):
        from transformers import AutoModelForCausalLM, LlamaConfig

        conf = LlamaConfig.from_pretrained(model_dir)
        conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers = args.hidden, 2 * args.hidden, args.layers
        AutoModelForCausalLM.from_config(conf).save_pretrained(model_dir)
    import pandas as pd
    from transformers import AutoTokenizer

    from raycat.train.stage import input_paths

    results = {}
    runs = ((1, "packed"), (2, "packed"), (1, "padded")) if args.device == "cpu" else ((1, "packed"),)
    if args.scaling_only:
        runs = runs[:2]
    for workers, batching in runs:
        name = f"raycat{workers}" if batching == "packed" else f"padded{workers}"
        run = build_tiny_train_run(work / name, model_dir, n=args.n)
        # Enough epochs for `steps` optimizer steps at this worker count; max_steps stops exactly there.
        per_epoch = max(1, args.n // (workers * args.micro_batch_size * args.accumulation))
        train = {
            "recipe": "sft_all",
            "method": "full",
            "device": args.device,
            "precision": "bf16" if args.device == "gpu" else "fp32",
            "num_workers": workers,
            "batching": batching,
            "save_steps": 10**6,
            "log_every_steps": 10**6,
            "deepspeed": {"zero_stage": args.zero_stage, **comm},
            "phase1": {
                "epochs": args.steps // per_epoch + 2,
                "max_steps": args.steps + 1,
                "lr": 1e-4,
                "micro_batch_size": args.micro_batch_size,
                "gradient_accumulation_steps": args.accumulation,
                "max_length": 256,
            },
        }
        tree = {
            "run_dir": str(run),
            "data": {"source": "synthetic"},
            "score": {"student": {"path": str(model_dir), "max_model_len": 512}},
            "train": train,
            "ray": {"num_cpus": 2},
        }
        cfg = validate_config(tree)
        t0 = time.perf_counter()
        with CpuSampler() as cpu:
            s = run_train(cfg, say=lambda m: None)
        wall = time.perf_counter() - t0
        metrics = json.loads((run / "train/sft_all/phase1/metrics.json").read_text())
        hist = metrics["history"][1:]
        # The steady-state window: from the first step's end to the last step's.
        w0 = metrics["first_step_done_at"]
        w1 = w0 + sum(h["step_s"] for h in hist)
        tps = sum(h["tokens"] for h in hist) / sum(h["step_s"] for h in hist)
        results[name] = {
            "devices": workers if args.device == "gpu" else cfg.train.cpus_per_worker * workers,
            "tokens": sum(h["tokens"] for h in hist),
            "tokens_per_s": tps,
            "wall_s": wall,
            "steps": len(hist) + 1,
            "padding_waste": s["phases"]["phase1"]["padding_waste"],
            "startup": metrics["startup"],
            "feed": metrics["data_feed_share"],
            "cpu": cores_busy(cpu, w0, w1),
        }
        if name == "raycat1" and args.device == "cpu" and (args.floors or not args.scaling_only):
            tok = AutoTokenizer.from_pretrained(model_dir)
            # sft_all's one phase: the three bands in order.
            rows = pd.concat([pd.read_parquet(p) for p in input_paths(cfg)[0].values()], ignore_index=True)
            enc, _ = encode_rows(tok, rows, "answer", stop_token_ids(tok, str(model_dir)), 1024, "drop")
        if name == "raycat1" and args.device == "cpu" and not args.scaling_only:
            t0 = time.perf_counter()
            results["bare"] = {
                "tokens_per_s": bare_loop(model_dir, enc, args.micro_batch_size, args.steps),
                "wall_s": time.perf_counter() - t0,
                "steps": args.steps + 1,
            }
    print(
        f"\nmodel: Llama hidden {args.hidden} x {args.layers} layers, {args.n} examples, micro-batch "
        f"{args.micro_batch_size} x {args.accumulation} per step and worker, ZeRO-{args.zero_stage} (1 worker runs "
        f"stage 0) {args.deepspeed}, full fine-tuning, "
        + ("bf16, 1 GPU" if args.device == "gpu" else "fp32, 1 thread per worker")
    )
    print(f"{'method':10} {'tokens/s':>10} {'wall s':>8} {'steps':>6} {'feed %':>7}")
    for k, v in results.items():
        feed = f"{100 * v['feed']:7.1f}" if v.get("feed") is not None else f"{'':7}"
        print(f"{k:10} {v['tokens_per_s']:10.0f} {v['wall_s']:8.1f} {v['steps']:6d} {feed}")
    print(f"\ncores busy during the steps after the first (this machine: {os.cpu_count()} CPUs)")
    for k, v in results.items():
        if v.get("cpu"):
            top = sorted(v["cpu"].items(), key=lambda x: -x[1])
            rest = sum(c for _, c in top[8:])
            print(f"{k:10} " + ", ".join(f"{g} {c:.2f}" for g, c in top[:8]) + f", the rest {rest:.2f}")
    print("\nphase start-up (s): worker group / model + DeepSpeed init / first step / after the last step")
    for k, v in results.items():
        if v.get("startup"):
            print(f"{k:10} " + " / ".join(f"{x:.1f}" for x in v["startup"].values()))
    if args.device == "cpu":
        r1, r2 = results["raycat1"]["tokens_per_s"], results["raycat2"]["tokens_per_s"]
        print(f"\nraycat 2 workers / 1 worker  = {r2 / r1:.2f}x   (goal >= 1.8 on 512x4; data-parallel scaling)")
    if args.device == "cpu" and not args.scaling_only:
        bare = results["bare"]["tokens_per_s"]
        print(f"raycat 1 worker / bare loop  = {r1 / bare:.2f}x   (goal >= 0.9; DeepSpeed + Ray Data feed overhead)")
        print(
            f"packed / padded micro-batches (1 worker) = {r1 / results['padded1']['tokens_per_s']:.2f}x real "
            f"tokens/s; padding waste {results['raycat1']['padding_waste']:.1%} packed vs "
            f"{results['padded1']['padding_waste']:.1%} padded"
        )

    if args.floors:
        print_floors(model_dir, enc, work, args, results)

    if args.json:
        from transformers import AutoModelForCausalLM

        from raycat.study import costs

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        r = results["raycat1"]
        rec = costs.record(
            bench="bench/train.py",
            kind="train",
            model=f"tiny-llama-{args.hidden}x{args.layers}",
            params=params,
            device=args.device,
            devices=r["devices"],
            tokens=r["tokens"],
            seconds=r["tokens"] / r["tokens_per_s"],
            method="full",
            checkpointing=False,
            dtype="bfloat16" if args.device == "gpu" else "float32",
            basis=f"raycat train, 1 worker, {args.steps} steps after the first",
        )
        costs.append_records(args.json, [rec])
        print(f"wrote {args.json}: {rec['tokens_per_s_per_device']:.1f} training tok/s per device")


if __name__ == "__main__":
    main()
