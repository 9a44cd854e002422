"""The corpus at scale (issue 21 item 6): a sharded .jsonl.gz corpus on S3 through every data stage,
with rows/s and the peak memory of the driver and of the largest Ray worker per stage.

    python bench/corpus.py                                   # 100k, 1M and 2M rows
    python bench/corpus.py --sizes 100000 1000000 10000000 --json bench/results/corpus.json
    python bench/corpus.py --sizes 5000 20000 --shards 2     # a quick check of the bench itself

The corpus lives on a real S3-compatible server on loopback: moto's, in its own process (never
imported here: it imports flask). Each size is written as gzip JSON Lines shards (MMLU-sized rows,
~300 characters, 4 options; gzip level 1), streamed to local disk one shard at a time, uploaded to
``s3://bench/corpus-<n>/part-00000.jsonl.gz`` ... and deleted locally. Shards hold
``--rows-per-shard`` rows (250k), at least 2 so every size takes the parallel reader, and at least 8
for the largest size; ``--shards N`` fixes the count for every size. The run dir is local (a temp dir).

Each size runs in a fresh driver process, one local Ray session (``ray.num_cpus=2``), the stages in order:

- questions: read + validate the shards on the workers (``questions.stage_questions``, one task per
  shard). ``score.run`` calls it first thing; the bench times that call from inside ``score.run``
  (it wraps ``raycat.data.questions.stage_questions``), so the corpus is read once.
- score: the rest of ``score.run``, null engine (``score.engine.backend: null``: uniform option scores,
  no model; the tiny test tokenizer renders real chat-template prompts): Ray Data pipeline, parts, merge.
- split: ``raycat.split.stage.run`` (one worker task).
- teach: ``raycat.teach.stage.prepare`` as a Ray task: the hard band selected into teach/rows.parquet
  (no teacher runs).
- train: ``raycat.train.stage.prepare`` as a Ray task, recipe ``sft_all`` (no CoT needed): every band's
  rows encoded, shuffled and written as training examples.

Memory is the peak resident set (Linux VmHWM), reset at each stage start by writing 5 to
/proc/<pid>/clear_refs for the driver and every process of the Ray session (the driver's descendants);
a sampler thread reads every process's VmHWM every 0.5 s, so a worker that exits mid-stage counts up
to its last sample. "Largest worker" is the Ray worker or actor process (``ray::...``) with the highest
peak, shown with what it gained in the stage, counted from the stage's latest start (score is entered
again after the questions stage inside it); the rest it already held (Ray keeps idle workers, and
Ray Data's actors can outlive their dataset), and the last task it ran; Ray's daemons are left out of
it, and the raylet's and GCS's peaks are shown on their own. Where
clear_refs cannot be written, sampled VmRSS is used instead (the header says which). A worker's RSS
includes the object-store pages it has touched (shared memory: RssShmem), so it can read higher than its
own heap: a task that reads many objects one after another (a questions settle task reads each
file's checked rows) touches them all. "private" is the largest sampled RssAnon of any worker in the stage (its own
heap, every 0.5 s, so a spike between samples can be missed): the memory the process itself holds.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

STAGES = ("questions", "score", "split", "teach", "train")
BUCKET = "bench"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------------------------------------------
# The driver process (one per size): the stages, and the memory meter.


def status_kib(pid: int | str, field: str) -> int | None:
    """One ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class Meter:
    """Per stage: wall time, the driver's peak RSS, the largest Ray worker's (and which), the raylet's
    and the GCS's. ``begin(stage)`` closes the running segment and opens one for ``stage``; a stage may
    have several segments (its wall times add up, its peaks are the max)."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval_s = interval_s
        self.stages: dict[str, dict] = {}
        self.current: str | None = None
        self.started = 0.0
        self.lock = threading.Lock()
        self.titles: dict[int, str] = {}
        self.reset_works = self._clear_refs(os.getpid())
        self.field = "VmHWM" if self.reset_works else "VmRSS"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _clear_refs(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _ray_processes(self) -> list:
        try:
            return self.me.children(recursive=True)
        except self.psutil.Error:
            return []

    def _title(self, proc) -> str:
        try:
            cmd = " ".join(proc.cmdline()).strip()
            name = proc.name()
        except self.psutil.Error:
            return self.titles.get(proc.pid, "?")
        if "raylet" in name or "/raylet" in cmd.split(" ")[0]:
            return "raylet"
        if "gcs_server" in name or "gcs_server" in cmd.split(" ")[0]:
            return "gcs_server"
        return cmd[:70] or name

    @staticmethod
    def _kind(title: str) -> str:
        if title in ("raylet", "gcs_server"):
            return title
        return "worker" if title.startswith("ray::") or "default_worker.py" in title else "daemon"

    def _sample(self) -> None:
        """Fold every process's current peak into the running stage (call with the lock held)."""
        if self.current is None:
            return
        stage = self.stages[self.current]
        driver = status_kib(os.getpid(), self.field) or 0
        stage["driver_kib"] = max(stage["driver_kib"], driver)
        for proc in self._ray_processes():
            kib = status_kib(proc.pid, self.field)
            if kib is None:
                continue
            title = self._title(proc)
            kind = self._kind(title)
            if kind == "worker":
                seen = stage["workers"].setdefault(proc.pid, {"peak": 0, "start": 0, "gain": 0, "title": title})
                seen["peak"] = max(seen["peak"], kib)
                seen["gain"] = max(seen["gain"], kib - seen["start"])
                seen["private"] = max(seen.get("private", 0), status_kib(proc.pid, "RssAnon") or 0)
                # The last task or actor it ran in this stage (between tasks a worker is ray::IDLE).
                if title != "ray::IDLE" or seen["title"] == "ray::IDLE":
                    seen["title"] = title
            elif kind in ("raylet", "gcs_server"):
                stage[f"{kind}_kib"] = max(stage[f"{kind}_kib"], kib)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            with self.lock:
                self._sample()

    def begin(self, name: str | None) -> None:
        """Close the running segment; open one for ``name`` (None: none) with every peak reset."""
        with self.lock:
            now = time.time()
            if self.current is not None:
                self._sample()
                self.stages[self.current]["wall_s"] += now - self.started
            self.current = name
            if name is None:
                return
            self.stages.setdefault(
                name,
                {
                    "wall_s": 0.0,
                    "driver_kib": 0,
                    "raylet_kib": 0,
                    "gcs_server_kib": 0,
                    # pid -> peak, resident at the stage's start (0: started in it), last title
                    "workers": {},
                },
            )
            procs = self._ray_processes()
            if self.reset_works:
                for pid in [os.getpid(), *(p.pid for p in procs)]:
                    self._clear_refs(pid)
            for proc in procs:
                kib = status_kib(proc.pid, "VmRSS")
                if kib is None:
                    continue
                # A stage entered again (score, after the questions stage inside it): a worker's gain is
                # counted from now, not what it gained in between (the questions writer's pages).
                seen = self.stages[name]["workers"].setdefault(
                    proc.pid, {"peak": 0, "start": kib, "gain": 0, "title": "ray::IDLE"}
                )
                seen["start"] = kib
            self.started = time.time()
            self._sample()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> dict:
        self.begin(None)
        self.stop.set()
        self.thread.join()
        mib = 1024.0
        out = {}
        for name, s in self.stages.items():
            workers = {pid: w for pid, w in s["workers"].items() if w["peak"]}
            largest = max(workers, key=lambda pid: workers[pid]["peak"], default=None)
            grew = max(workers, key=lambda pid: workers[pid]["gain"], default=None)
            w, g = workers.get(largest), workers.get(grew)
            private = max(workers, key=lambda pid: workers[pid].get("private", 0), default=None)
            p = workers.get(private)
            out[name] = {
                "wall_s": round(s["wall_s"], 2),
                "driver_peak_mib": round(s["driver_kib"] / mib, 1),
                "worker_peak_mib": round(w["peak"] / mib, 1) if w else 0.0,
                # How much of that peak it gained in this stage (the rest it held when the stage began).
                "worker_gain_mib": round(w["gain"] / mib, 1) if w else 0.0,
                "worker": w["title"] if w else None,
                "worker_private_peak_mib": round(p.get("private", 0) / mib, 1) if p else 0.0,
                "worker_private": p["title"] if p else None,
                "most_gained_worker": g["title"] if g else None,
                "most_gained_worker_peak_mib": round(g["peak"] / mib, 1) if g else 0.0,
                "most_gained_worker_gain_mib": round(g["gain"] / mib, 1) if g else 0.0,
                "workers_seen": len(workers),
                "raylet_peak_mib": round(s["raylet_kib"] / mib, 1),
                "gcs_peak_mib": round(s["gcs_server_kib"] / mib, 1),
            }
        return out


def child(tree: dict, out: Path, wanted: list[str]) -> None:
    """One size: every stage in one Ray session; results (with rows per stage) written to ``out``."""
    import ray

    from raycat.config import for_workers, validate_config
    from raycat.data import questions
    from raycat.ray_env import ray_session, remote_call
    from raycat.score import stage as score
    from raycat.split import stage as split
    from raycat.teach import stage as teach
    from raycat.train import stage as train

    cfg = validate_config(tree)
    meter = Meter()
    rows: dict[str, tuple[int, int]] = {}
    with ray_session(cfg.ray, cfg.run_dir):
        meter.start()
        original = questions.stage_questions

        def timed_questions(c):
            meter.begin("questions")
            try:
                return original(c)
            finally:
                meter.begin("score")

        # score.run calls it through the module: the questions stage is timed where it really runs.
        questions.stage_questions = timed_questions
        try:
            meter.begin("score")
            metrics = score.run(cfg)
        finally:
            questions.stage_questions = original
        summary = metrics["questions"]
        rows["questions"] = (summary["rows_read"], summary["selected"])
        rows["score"] = (summary["selected"], metrics["scored"])

        meter.begin("split")
        info = split.run(cfg)
        rows["split"] = (metrics["scored"], info["pool_rows"] + info["test_rows"])

        worker_cfg = for_workers(cfg)
        if "teach" in wanted:
            meter.begin("teach")
            taught = remote_call(ray.remote(num_cpus=1)(teach.prepare), worker_cfg)
            rows["teach"] = (sum(info["counts"][b] for b in teach.taught_bands(cfg)), taught)
        if "train" in wanted:
            meter.begin("train")
            plans, _ = remote_call(ray.remote(num_cpus=1)(train.prepare), worker_cfg)
            rows["train"] = (sum(p.stats["rows"] for p in plans), sum(p.stats["examples"] for p in plans))
        stages = meter.close()
    for name, (n_in, n_out) in rows.items():
        stages[name].update(rows_in=n_in, rows_out=n_out, rows_per_s=round(n_in / max(stages[name]["wall_s"], 1e-9)))
    result = {
        "stages": stages,
        "peak_method": "VmHWM reset per stage (clear_refs)" if meter.reset_works else "sampled VmRSS every 0.5 s",
        "ray": ray.__version__,
        "questions_summary": summary,
        "split_counts": info["counts"],
    }
    out.write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------
# The parent: moto, the corpus, one driver process per size, the tables.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            sys.exit(f"moto's S3 server exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if time.time() > deadline:
                stop_group(proc)
                sys.exit("moto's S3 server did not come up in 60 s")
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM (then SIGKILL) the process group this bench started for ``proc`` (by its PID)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def row(i: int) -> str:
    """One MMLU-sized question (~300 characters) with 4 options."""
    q = f"Question {i}: " + "which of the following statements about the system is correct? " * 4
    options = [f"option {j} of {i}" for j in range(4)]
    return json.dumps({"qid": f"q{i}", "question": q, "options": options, "answer": "B"})


def write_corpus(s3, work: Path, n: int, shards: int) -> tuple[str, int]:
    """``shards`` gzip JSON Lines files of consecutive rows, each written locally, uploaded, deleted.
    Returns the prefix URI and the bytes uploaded."""
    prefix, total, per = f"corpus-{n}", 0, math.ceil(n / shards)
    for s in range(shards):
        local = work / f"part-{s:05d}.jsonl.gz"
        with gzip.open(local, "wt", compresslevel=1) as f:
            for i in range(s * per, min(n, (s + 1) * per)):
                f.write(row(i) + "\n")
        total += local.stat().st_size
        s3.upload_file(str(local), BUCKET, f"{prefix}/{local.name}")
        local.unlink()
    return f"s3://{BUCKET}/{prefix}/", total


def delete_prefix(s3, prefix: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def config(run_dir: Path, corpus: str, model: Path) -> dict:
    lm = {"path": str(model), "max_model_len": 512}
    return {
        "run_dir": str(run_dir),
        "data": {
            "source": "generic",
            "path": corpus,
            "columns": {"id": "qid", "question": "question", "options": "options", "answer": "answer"},
            "answer_format": "letter",
        },
        "score": {"student": lm, "deviation_sample": 0, "engine": {"backend": "null", "batch_size": 512}},
        "split": {"quantiles": [0.25, 0.75], "test_fraction": 0.1},
        # Only the selection runs (teach.stage.prepare); the teacher is never started.
        "teach": {"teachers": [{"model": lm, "engine": {"backend": "null"}}], "bands": ["hard"]},
        "train": {"recipe": "sft_all", "phase1": {"max_length": 512}},
        "ray": {"num_cpus": 2},
    }


def shard_counts(sizes: list[int], shards: int | None, rows_per_shard: int) -> dict[int, int]:
    if shards:
        return {n: shards for n in sizes}
    largest = max(sizes)
    return {n: max(2, 8 if n == largest else 0, math.ceil(n / rows_per_shard)) for n in sizes}


def print_size(res: dict) -> None:
    print(
        f"\n{res['n']:,} rows: {res['shards']} shards x {res['rows_per_shard']:,} rows, "
        f"{res['corpus_bytes'] / 2**20:.1f} MiB gzip, written + uploaded in {res['corpus_write_s']:.1f} s; "
        f"driver process {res['child_wall_s']:.0f} s"
    )
    print(
        f"  {'stage':<10}{'rows in':>11}{'rows out':>11}{'wall s':>9}{'rows/s':>10}"
        f"{'driver MiB':>12}{'worker MiB':>12}{'gained':>8}{'private':>9}{'raylet':>8}{'gcs':>6}"
        "  largest worker (of workers seen)"
    )
    ran = [name for name in STAGES if name in res["stages"]]
    for name in ran:
        s = res["stages"][name]
        print(
            f"  {name:<10}{s['rows_in']:>11,}{s['rows_out']:>11,}{s['wall_s']:>9.1f}{s['rows_per_s']:>10,}"
            f"{s['driver_peak_mib']:>12.0f}{s['worker_peak_mib']:>12.0f}{s['worker_gain_mib']:>+8.0f}"
            f"{s.get('worker_private_peak_mib', 0):>9.0f}"
            f"{s['raylet_peak_mib']:>8.0f}{s['gcs_peak_mib']:>6.0f}  {s['worker']} (of {s['workers_seen']})"
        )
    for name in ran:
        s = res["stages"][name]
        if s["most_gained_worker_gain_mib"] > s["worker_gain_mib"]:
            print(
                f"  {name}: the worker that gained most: {s['most_gained_worker']}, "
                f"{s['most_gained_worker_peak_mib']:.0f} MiB ({s['most_gained_worker_gain_mib']:+.0f} in the stage)"
            )
    sys.stdout.flush()


def ratios(results: list[dict]) -> dict:
    """Measured peak at the largest size over the peak at 1M rows (if run) and at the smallest size."""
    largest = results[-1]
    bases = {r["n"]: r for r in results[:-1] if r["n"] in (1_000_000, results[0]["n"])}
    out = {}
    for name in [name for name in STAGES if name in largest["stages"]]:
        for who in ("driver", "worker", "worker_private"):
            key = f"{who}_peak_mib"
            for n, base in bases.items():
                b = base["stages"][name][key]
                out.setdefault(name, {})[f"{who} {largest['n']:,}/{n:,}"] = (
                    round(largest["stages"][name][key] / b, 2) if b else None
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--shards", type=int, default=None, help="shards for every size (default: by --rows-per-shard)")
    parser.add_argument("--rows-per-shard", type=int, default=250_000, help="rows per shard when --shards is unset")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds one size may take")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        help="questions, score and split always run; leave out teach or train to save time",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child[0]), Path(args.child[1]), json.loads(args.child[2]))
        return
    import boto3

    from raycat.testing.tiny_models import build_tiny_model

    sizes = sorted(args.sizes)
    shards = shard_counts(sizes, args.shards, args.rows_per_shard)
    work = Path(tempfile.mkdtemp(prefix="raycat-corpus-"))
    model = build_tiny_model(work / "model")
    moto, url = start_moto(work / "moto.log")
    aws = {**AWS, "AWS_ENDPOINT_URL": url}
    machine = {
        "cpus": os.cpu_count(),
        "ray_num_cpus": 2,
        "ray": importlib.metadata.version("ray"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "s3": f"moto {importlib.metadata.version('moto')} server on {url} (loopback, own process)",
        "run_dir": f"local: {work}",
        "engine": "null (no model; tiny test tokenizer)",
    }
    print(
        f"raycat corpus bench: {machine['cpus']} CPUs (Ray num_cpus=2), Ray {machine['ray']}, Python "
        f"{machine['python']}; corpus on {machine['s3']}; run dir {machine['run_dir']}; engine {machine['engine']}",
        flush=True,
    )
    results: list[dict] = []
    failures: list[dict] = []
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        env = dict(
            os.environ,
            **aws,
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        for n in sizes:
            t = time.time()
            corpus, nbytes = write_corpus(s3, work, n, shards[n])
            write_s = time.time() - t
            run_dir, out = work / f"run-{n}", work / f"result-{n}.json"
            log = work / f"driver-{n}.log"
            t = time.time()
            with log.open("w") as f:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        json.dumps(config(run_dir, corpus, model)),
                        str(out),
                        json.dumps(args.stages),
                    ],
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
                try:
                    rc = proc.wait(timeout=args.timeout)
                finally:
                    stop_group(proc)
            if rc or not out.exists():
                # Kept in the results (an OOM kill at the largest size is a finding); the larger sizes are not run.
                tail = log.read_text()[-4000:]
                failed = {"n": n, "shards": shards[n], "failed_rc": rc, "child_wall_s": round(time.time() - t, 1)}
                failures.append({**failed, "log_tail": tail})
                print(f"\n{n:,} rows FAILED (rc {rc}) after {failed['child_wall_s']:.0f} s; {log}:\n{tail}", flush=True)
                break
            res = {
                "n": n,
                "shards": shards[n],
                "rows_per_shard": math.ceil(n / shards[n]),
                "corpus_bytes": nbytes,
                "corpus_write_s": round(write_s, 1),
                "child_wall_s": round(time.time() - t, 1),
                **json.loads(out.read_text()),
            }
            machine["peak_method"] = res.pop("peak_method")
            results.append(res)
            print_size(res)
            delete_prefix(s3, f"corpus-{n}/")
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        stop_group(moto)
    summary = ratios(results) if len(results) > 1 else {}
    if summary:
        cols = list(next(iter(summary.values())))
        print(f"\nPeak RSS ratios, measured ({machine['peak_method']}):")
        print(f"  {'stage':<10}" + "".join(f"{c:>24}" for c in cols))
        for name, r in summary.items():
            print(f"  {name:<10}" + "".join(f"{'-' if r[c] is None else r[c]:>24}" for c in cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine, "sizes": results, "failed": failures, "ratios_measured": summary}, indent=2)
        )
    if failures:
        sys.exit(f"failed at {failures[0]['n']:,} rows; logs kept in {work}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
