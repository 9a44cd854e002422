"""What this machine allows a data-parallel fit, without raycat: the ceilings bench/train.py compares with.

ddp_rate            torch DDP (gloo) over `world` processes, no Ray, no DeepSpeed: the same model, packed
                    micro-batches, one thread per process and step timing as raycat's workers. 2 processes
                    / 1 is the scaling a synchronous data-parallel loop reaches on these cores alone.
ray_train_ddp_rate  the same DDP loop as Ray Train workers, rows in the loop's config (no Ray Data feed, no
                    DeepSpeed): the same with Ray's processes beside the workers, as raycat's fit has.
ray_train_start     a TorchTrainer whose loop only records when it was entered and reads one batch of a
                    dataset: Ray Train's own worker-group start (controller, workers, process group,
                    dataset split) on this machine.
fresh_start         a fresh Python process that has imported torch (as a Ray Train worker has before
                    raycat's loop starts) imports DeepSpeed and transformers, loads the model and builds
                    the DeepSpeed engine (ZeRO-0, one rank): the floor of "model + DeepSpeed".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_steps(rank: int, world: int, model_dir: str, rows: list, mbs: int, steps: int) -> dict:
    """The bare DDP loop (with ``world`` 1 a plain loop, no process group needed): real tokens and
    seconds over the steps after the first (which pays allocation and lazy init), each step timed as
    raycat's ``step_s`` is, from the previous step's end (building its batch and any wait for the
    other rank included); ``t0``/``t1``: the window's wall clock."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from raycat.train.batches import pack

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, last, t0 = 0, 0.0, 0.0
    for step in range(steps + 1):
        # Rank r takes every world-th micro-batch of the rows in order (raycat's equal split deals
        # whole blocks of its shuffled examples instead; the synthetic rows are of near-equal length).
        lo = ((step * world + rank) * mbs) % len(rows)
        ids, labels = zip(*rows[lo : lo + mbs], strict=True)
        b = {k: torch.from_numpy(v) for k, v in pack(list(ids), list(labels)).items()}
        ddp(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step == 0:
            if world > 1:
                dist.barrier()
            last, t0 = time.perf_counter(), time.time()
        else:
            tokens += b["input_ids"].numel()
    return {"tokens": tokens, "seconds": time.perf_counter() - last, "t0": t0, "t1": time.time()}


def _ddp_worker(rank: int, world: int, port: int, model_dir: str, rows: list, mbs: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    Path(f"{out}.{rank}").write_text(json.dumps(ddp_steps(rank, world, model_dir, rows, mbs, steps)))
    dist.destroy_process_group()


def _rate(out: str, world: int) -> dict:
    """All ranks' real tokens over the slowest rank's window; rank 0's window."""
    parts = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    rate = sum(p["tokens"] for p in parts) / max(p["seconds"] for p in parts)
    return {"rate": rate, "t0": parts[0]["t0"], "t1": parts[0]["t1"]}


def ddp_rate(model_dir: Path, encoded, world: int, mbs: int, steps: int) -> float:
    """Real tokens per second of all ranks together, over the steps after the first."""
    import torch.multiprocessing as mp

    rows = list(zip(encoded["input_ids"], encoded["labels"], strict=True))
    with tempfile.TemporaryDirectory(prefix="raycat-ddp-") as tmp:
        args = (world, _free_port(), str(model_dir), rows, mbs, steps, f"{tmp}/done")
        mp.start_processes(_ddp_worker, args=args, nprocs=world, start_method="spawn")
        return _rate(f"{tmp}/done", world)["rate"]


def ray_train_ddp_rate(model_dir: Path, encoded, world: int, mbs: int, steps: int, num_cpus: int = 2) -> dict:
    """``ddp_rate`` with the processes as Ray Train workers (Ray Train's process group, a local Ray as
    raycat starts it: ray_session), the rows in the loop's config: no Ray Data feed, no DeepSpeed. Against
    ``ddp_rate``, what Ray's processes beside the workers cost; against raycat, what its loop costs.
    ``{"rate", "t0", "t1"}``: the window's wall clock, for a CPU sampler."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycat.config import RayConfig
    from raycat.ray_env import ray_session

    def loop(config: dict) -> None:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        done = ddp_steps(rank, config["world"], config["model_dir"], config["rows"], config["mbs"], config["steps"])
        Path(f"{config['out']}.{rank}").write_text(json.dumps(done))

    # bench/ is not on the workers' path: the loop and ddp_steps travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = list(zip(encoded["input_ids"], encoded["labels"], strict=True))
    with tempfile.TemporaryDirectory(prefix="raycat-raytrain-ddp-") as tmp:
        config = {"world": world, "model_dir": str(model_dir), "rows": rows, "mbs": mbs, "steps": steps}
        config["out"] = f"{tmp}/done"
        with ray_session(RayConfig(num_cpus=num_cpus)):
            TorchTrainer(
                loop,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(storage_path=f"{tmp}/runs"),
            ).fit()
        return _rate(config["out"], world)


def ray_train_start(dataset_path: str, num_cpus: int = 2) -> float:
    """Seconds from ``TorchTrainer.fit()`` to its one worker entering the loop (a local Ray is started
    first, not counted), as raycat's metrics.json ``worker_group_s`` counts."""
    import ray
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raycat.config import RayConfig
    from raycat.ray_env import ray_session

    def loop(config: dict) -> None:
        import ray.train

        entered = time.time()
        next(iter(ray.train.get_dataset_shard("train").iter_batches(batch_size=1)))
        Path(config["out"]).write_text(json.dumps({"entered": entered}))

    with tempfile.TemporaryDirectory(prefix="raycat-raytrain-") as tmp:
        with ray_session(RayConfig(num_cpus=num_cpus)):
            started = time.time()
            TorchTrainer(
                loop,
                train_loop_config={"out": f"{tmp}/entered.json"},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                datasets={"train": ray.data.read_parquet(dataset_path)},
                run_config=RunConfig(storage_path=f"{tmp}/runs"),
            ).fit()
        return json.loads(Path(f"{tmp}/entered.json").read_text())["entered"] - started


_FRESH = """
import os, sys, time
import torch  # a Ray Train worker has imported it before raycat's loop starts (worker_group_s)
t0 = time.perf_counter()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from transformers import AutoModelForCausalLM
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # as raycat's loop (_no_shm_build)
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
imported = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
params = list(model.parameters())
config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
          "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}
deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-4), model_parameters=params, config=config)
print(imported - t0, time.perf_counter() - imported)
"""


def fresh_start(model_dir: Path) -> tuple[float, float]:
    """(imports after torch, model load + DeepSpeed engine) seconds in a fresh Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _FRESH, str(model_dir), str(_free_port())],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"fresh start failed:\n{done.stderr[-3000:]}")
    imports, build = (float(x) for x in done.stdout.strip().splitlines()[-1].split())
    return imports, build
