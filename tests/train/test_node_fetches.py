"""What a training worker brings to its node, and what rank 0 gathers: only the weights of the model a phase
loads; with two real DeepSpeed ranks (gloo, CPU, no Ray Train) on a tiny model, a ZeRO-3 LoRA export that
gathers only the adapter, and a restore from a checkpoint on a remote filesystem that fetches only the
rank's own shards (the files all ranks share once per node) and resumes the trained state."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raycat.config import LoraSettings, PhaseConfig
from raycat.storage import models
from raycat.train import loop
from raycat.train.loop import LoopConfig

pytestmark = pytest.mark.filterwarnings("ignore")

WORLD = 2


class _RecordingHandler(pafs.FileSystemHandler):
    """A local directory seen as a remote filesystem (not a ``LocalFileSystem``, so nothing reads it in
    place) that records every file opened for reading."""

    def __init__(self, root: str, opened: list[str]):
        self.fs = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
        self.opened = opened

    def get_type_name(self):
        return "recording"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def create_dir(self, path, recursive):
        raise OSError("read-only")

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = create_dir
    move = copy_file = open_output_stream = open_append_stream = create_dir


def _loop_config(root: Path, model_dir: Path, zero_stage: int, method: str) -> LoopConfig:
    return LoopConfig(
        student_path=str(model_dir),
        student_revision=None,
        trust_remote_code=False,
        init_model=None,
        init_adapter=None,
        model_dir=str(root / "model"),
        phase_dir=str(root / "phase"),
        phase_hash="h",
        phase_settings={},
        info={},
        method=method,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        zero_stage=zero_stage,
        offload_optimizer=False,
        offload_param=False,
        bf16=False,
        device="cpu",
        threads=1,
        batching="padded",
        gradient_checkpointing=False,
        recipe="complexity_aware",
        phase_name="phase1",
        phase=PhaseConfig(micro_batch_size=2, gradient_accumulation_steps=1, lr=0.01),
        total_steps=10,
        pad_id=0,
        seed=0,
        feed_layout={"version": 1, "read_tasks": 1, "read_spans": "s", "world": 1},
        save_steps=2,
        log_every_steps=1,
        tracking="none",
        tracking_uri=None,
        tracking_project="raycat",
    )


def _trainable(engine) -> dict:
    """This rank's view of the trainable parameters, whole (gathered under ZeRO-3)."""
    import deepspeed
    import torch

    named = [(n.replace(".default.", "."), p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None), torch.no_grad():
        return {n: p.detach().clone() for n, p in named}


def _rank(rank: int, port: int, root: str, model_dir: str, zero_stage: int, method: str) -> None:
    """One rank: 2 optimizer steps, the export (gathers recorded), a checkpoint copied into ``root/ckpt``
    as Ray Train merges the ranks' dirs, then a fresh engine restored from it through a recording
    filesystem. Writes what it saw to ``root/rank<rank>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import Init

    from raycat.train.batches import collate

    torch.set_num_threads(1)
    loop._no_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    root_dir = Path(root)
    cfg = _loop_config(root_dir, Path(model_dir), zero_stage, method)
    run = loop.PhaseRun(cfg, rank, WORLD)
    run.setup(None, 0.0, 0.0, "fit")
    initial = _trainable(run.engine)
    ids = [[5 + rank, 6, 7, 8, 9, 10], [11, 12, 13 + rank, 14]]
    batch = {k: torch.from_numpy(v) for k, v in collate(ids, ids, 0).items()}
    for _ in range(2):
        run._optimizer_step([batch])
    run.state.update(epoch=0, batch=2, micro_steps=run.engine.micro_steps)

    names = {id(p): n for n, p in run.engine.module.named_parameters()}
    frozen = sorted(n for n, p in run.engine.module.named_parameters() if not p.requires_grad)
    gathered: list[str] = []
    real_all_gather = Init._all_gather

    def recording_all_gather(self, param_list, *args, **kwargs):
        gathered.extend(names.get(id(p), "?") for p in param_list)
        return real_all_gather(self, param_list, *args, **kwargs)

    Init._all_gather = recording_all_gather
    try:
        run._export()
    finally:
        Init._all_gather = real_all_gather
    trained = _trainable(run.engine)

    def merge_into_storage(metrics, checkpoint=None, checkpoint_dir_name=None):
        shutil.copytree(checkpoint.path, root_dir / "ckpt", dirs_exist_ok=True)

    ray.train.report = merge_into_storage
    run.save_checkpoint(False, {"step": run.engine.global_steps})
    saved_state, saved_steps = dict(run.state), run.engine.global_steps
    run.engine.destroy()
    dist.barrier()

    opened: list[str] = []
    remote = pafs.PyFileSystem(_RecordingHandler(root, opened))
    resumed = loop.PhaseRun(cfg, rank, WORLD)
    resumed.setup(ray.train.Checkpoint("ckpt", filesystem=remote), 0.0, 0.0, "fit")
    restored = _trainable(resumed.engine)
    in_storage = sorted(str(p.relative_to(root_dir / "ckpt")) for p in (root_dir / "ckpt").rglob("*") if p.is_file())
    (root_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "frozen": frozen,
                "gathered": gathered,
                "opened": sorted(opened),
                "in_storage": in_storage,
                "steps": [saved_steps, resumed.engine.global_steps],
                "batch": [saved_state["batch"], resumed.state["batch"]],
                "restored_equal": all(torch.equal(trained[n], restored[n]) for n in trained),
                # Trained, and restored rather than re-initialised.
                "moved": any(not torch.equal(initial[n], restored[n]) for n in restored),
                "trained": {n: t.tolist() for n, t in trained.items()} if rank == 0 and method == "lora" else {},
            }
        )
    )
    resumed.engine.destroy()
    # The same checkpoint under another feed layout (a worker more): refused mid-epoch, before any load.
    moved = loop.PhaseRun(dataclasses.replace(cfg, feed_layout={**cfg.feed_layout, "world": WORLD + 1}), rank, WORLD)
    try:
        moved.setup(ray.train.Checkpoint(str(root_dir / "ckpt")), 0.0, 0.0, "fit")
        refusal = None
    except RuntimeError as e:
        refusal = str(e)
    moved.engine.destroy()
    seen = json.loads((root_dir / f"rank{rank}.json").read_text())
    seen.update(refusal=refusal, saved_feed=saved_state["feed"], resumed_feed=resumed.state["feed"])
    (root_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def _run_ranks(root: Path, model_dir: Path, zero_stage: int, method: str) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(root), str(model_dir), zero_stage, method), nprocs=WORLD, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_only_the_model_a_phase_starts_from_is_fetched(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAYCAT_CACHE", str(tmp_path / "cache"))
    fetched = []
    real_localize = models.localize

    def localize(uri, *, weights=True):
        # The student on an object store, served from the tiny model on local disk.
        fetched.append((uri, weights))
        return real_localize(uri.replace("s3://bucket/student", f"file://{tiny_model_dir}"), weights=weights)

    monkeypatch.setattr(models, "localize", localize)
    first = dataclasses.replace(_loop_config(tmp_path, tiny_model_dir, 0, "full"), student_path="s3://bucket/student")
    no_zero = {"zero_optimization": {"stage": 0}}
    loop._load_model(first, no_zero)
    assert fetched == [("s3://bucket/student", True)]
    # A full phase after the first starts from the previous export; the student's weights stay remote.
    fetched.clear()
    after = dataclasses.replace(first, init_model=str(tiny_model_dir))
    model = loop._load_model(after, no_zero)[0]
    assert model.config.name_or_path == str(tiny_model_dir)
    assert fetched == []


@pytest.fixture(scope="module")
def zero3_lora(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("zero3-lora")
    return root, _run_ranks(root, tiny_model_dir, 3, "lora")


@pytest.fixture(scope="module")
def zero2_full(tmp_path_factory, tiny_model_dir):
    """Below ZeRO-3 rank 0 alone writes the model states (mp_rank_00_model_states.pt), read by all ranks."""
    root = tmp_path_factory.mktemp("zero2-full")
    return root, _run_ranks(root, tiny_model_dir, 2, "full")


@pytest.mark.integration
def test_zero3_lora_export_gathers_only_the_adapter(zero3_lora):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, ranks = zero3_lora
    for seen in ranks:
        assert seen["gathered"], "the export gathered nothing: the spy is not on the gather path"
        assert not set(seen["gathered"]) & set(seen["frozen"])
    adapter = load_file(root / "model" / "adapter_model.safetensors")
    trained = {n: torch.tensor(v) for n, v in ranks[0]["trained"].items()}
    assert set(adapter) == set(trained)
    for name, value in trained.items():
        assert torch.equal(adapter[name], value), name
    # The exported dir loads as an adapter on the student, with the trained weights.
    config = json.loads((root / "model" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, root / "model")
    got = {n.replace(".default.", "."): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(got) == set(trained)
    assert all(torch.equal(got[n], trained[n]) for n in trained)
    assert (root / "model" / "tokenizer.json").is_file()


@pytest.mark.integration
@pytest.mark.parametrize("written_by", ["zero3_lora", "zero2_full"])
def test_restore_fetches_only_this_ranks_shards_and_resumes(written_by, request):
    _, ranks = request.getfixturevalue(written_by)
    files = set(ranks[0]["in_storage"])
    shards = {r: {f for f in files if f"zero_pp_rank_{r}_" in f} for r in range(WORLD)}
    assert all(shards.values()), files  # each rank wrote model and optimizer shards
    opened = [[f.removeprefix("ckpt/") for f in seen["opened"]] for seen in ranks]
    for rank, seen in enumerate(ranks):
        others = set().union(*(shards[r] for r in range(WORLD) if r != rank))
        assert shards[rank] <= set(opened[rank])
        assert not set(opened[rank]) & others, f"rank {rank} fetched other ranks' shards"
        assert seen["steps"][1] == seen["steps"][0] == 2
        assert seen["batch"][1] == seen["batch"][0] == 2
        assert seen["restored_equal"] and seen["moved"]
        # state.json records the feed layout; another one is refused, naming how to go on.
        assert seen["saved_feed"] == seen["resumed_feed"] and seen["saved_feed"]["world"] == 1
        assert seen["refusal"] is not None and "train.num_workers: 1" in seen["refusal"]
    # The ranks share a node: everything else (state.json, DeepSpeed's tag file) is fetched once for both.
    fetched = opened[0] + opened[1]
    assert sorted(fetched) == sorted(files) and "state.json" in fetched
