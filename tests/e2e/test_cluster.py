"""A simulated multi-node cluster on loopback, submitted to as the README says.

A real S3-compatible server (moto's server mode), a Ray head with 0 CPUs started by `ray start --head`
with token authentication on, and two worker nodes joined with `ray start --address`, each in its own
mount namespace where the test's temp dirs (models, local run dirs, the head's Ray dirs) are hidden
behind an empty tmpfs and HOME / TMPDIR are private: anything that works only through the head's
local disk fails here. The job is the README's `ray job submit` line, with only its placeholders
(<head>, the dashboard port, <bucket>) filled in and the config it names replaced by a tiny one.
Everything is started and stopped by PID (process groups this module created).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, moto_s3, stop_group

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

README = ROOT / "README.md"
BUCKET = "raycat-test"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_submit_command() -> str:
    """The README's cluster `ray job submit` command, joined into one shell line."""
    text = README.read_text()
    block = re.search(r"```bash\n(RAY_AUTH_MODE=token ray job submit[^`]*?)```", text)
    assert block, "README lost its `RAY_AUTH_MODE=token ray job submit` block"
    return block.group(1).replace("\\\n", " ").strip()


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    """Any HTTP answer (a 401 from an authenticating server too) means the server is up."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            assert time.time() < deadline, f"{what} did not come up in {timeout_s:.0f} s"
            time.sleep(1)


def _listed(stdout: str) -> list[dict]:
    """`ray list ... --format json` output; with nothing to list it prints "No resource in the
    cluster" instead of an empty JSON list."""
    if stdout.strip().startswith("No resource"):
        return []
    return json.loads(stdout)


class Cluster:
    def __init__(self, root: Path, dashboard: str, env: dict, client_env: dict, s3):
        self.root, self.dashboard, self.env, self.client_env, self.s3 = root, dashboard, env, client_env, s3

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.client_env, capture_output=True, text=True, timeout=timeout
        )

    def jobs(self) -> list[dict]:
        r = self.ray("list", "jobs", "--address", self.dashboard, "--format", "json", "--limit", "100")
        assert r.returncode == 0, r.stderr[-2000:]
        return _listed(r.stdout)

    def alive_actors(self) -> list[str]:
        r = self.ray("list", "actors", "--address", self.dashboard, "--filter", "state=ALIVE", "--format", "json")
        assert r.returncode == 0, r.stderr[-2000:]
        return [a["class_name"] for a in _listed(r.stdout)]

    def s3_exists(self, key: str) -> bool:
        import pyarrow.fs as pafs

        return self.s3.get_file_info(f"{BUCKET}/{key}").type != pafs.FileType.NotFound

    def s3_json(self, key: str):
        with self.s3.open_input_stream(f"{BUCKET}/{key}") as f:
            return json.loads(f.read())

    def s3_find(self, prefix: str, needle: str) -> bool:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True)
        return any(needle in i.path for i in self.s3.get_file_info(sel))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    if not shutil.which("unshare") or not _can_unshare():
        pytest.skip("needs `unshare --mount` (root or user namespaces) to give each worker node private disk")
    import boto3
    import pyarrow.fs as pafs

    # Short: Ray's unix sockets live under the head's --temp-dir and may not exceed 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    servers = contextlib.ExitStack()
    try:
        gcs, dash = _free_port(), _free_port()
        aws = servers.enter_context(moto_s3(root / "s3.log"))
        # This test process reads the bucket too; removed again below
        os.environ.update(aws)
        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        s3 = pafs.S3FileSystem(endpoint_override=aws["AWS_ENDPOINT_URL"], access_key="testing", secret_key="testing")
        s3.create_dir(f"{BUCKET}/models/student")
        pafs.copy_files(str(tiny_model_dir), f"{BUCKET}/models/student", destination_filesystem=s3)

        # The user's machine: a HOME with a Ray token, as `ray get-auth-token --generate` leaves it.
        home = root / "home"
        home.mkdir()
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        base.update(aws, RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ['PATH']}")
        gen = subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"], env={**base, "HOME": str(home)}, capture_output=True
        )
        assert gen.returncode == 0, gen.stderr[-2000:]
        token = (home / ".ray" / "auth_token").read_text().strip()

        # No RAY_AUTH_MODE: the token file turns auth on
        head_env = {**base, "HOME": str(home)}
        head = _start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                f"--dashboard-port={dash}",
                "--dashboard-host=127.0.0.1",
                # As in the manifests: the head runs drivers, no work
                "--num-cpus=0",
                "--disable-usage-stats",
                f"--temp-dir={root / 'head'}",
            ],
            head_env,
            root / "head.log",
        )
        procs.append(head)
        dashboard = f"http://127.0.0.1:{dash}"
        _wait_up(f"{dashboard}/api/version", head, 120, "the Ray head's dashboard", root / "head.log")
        head_log = (root / "head.log").read_text()
        assert "Token authentication is enabled" in head_log, head_log[-2000:]

        hidden = [str(tmp_path_factory.getbasetemp()), str(root)]
        for i in range(2):
            scratch = f"{root}/node{i}"
            inner = " && ".join(
                [*(f"mount -t tmpfs tmpfs {shlex.quote(h)}" for h in hidden)]
                + [
                    f"mkdir -p {scratch}/home {scratch}/tmp",
                    f"HOME={scratch}/home TMPDIR={scratch}/tmp exec {shlex.quote(str(BIN / 'ray'))} start "
                    f"--address=127.0.0.1:{gcs} --block --num-cpus=1 --disable-usage-stats",
                ]
            )
            worker_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
            procs.append(
                _start(
                    ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                    worker_env,
                    root / f"worker{i}.log",
                )
            )
        client_env = {**base, "HOME": str(home), "RAY_AUTH_MODE": "token"}
        running = Cluster(root, dashboard, head_env, client_env, s3)
        deadline = time.time() + 120
        while True:
            listed = running.ray("list", "nodes", "--address", dashboard, "--format", "json")
            nodes = _listed(listed.stdout) if listed.returncode == 0 else []
            if sum(n["state"] == "ALIVE" for n in nodes) == 3:
                break
            for p in procs:
                assert p.poll() is None, f"a cluster process exited: {p.args}"
            assert time.time() < deadline, f"worker nodes did not join: {listed.stdout[-2000:]} {listed.stderr[-2000:]}"
            time.sleep(2)
        yield running
    finally:
        for p in reversed(procs):
            # `ray start --block` stops the daemons it started
            stop_group(p, 60)
        servers.close()
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            os.environ.pop(k, None)
        shutil.rmtree(root, ignore_errors=True)


def _job_dir(tmp_path: Path, tree: dict) -> Path:
    """A working dir holding, at the path the README names, a tiny config instead of the 3B one."""
    job = tmp_path / "job"
    cmd = readme_submit_command()
    config = re.search(r"--config (\S+)", cmd).group(1)
    (job / config).parent.mkdir(parents=True)
    (job / config).write_text(yaml.safe_dump(tree))
    return job


def _submit(cluster: Cluster, job: Path, run_prefix: str, *extra: str, wait: bool = True):
    cmd = readme_submit_command()
    port = cluster.dashboard.rsplit(":", 1)[1]
    cmd = cmd.replace("<head>:8265", f"127.0.0.1:{port}").replace("s3://<bucket>/raycat/", f"s3://{BUCKET}/")
    cmd = re.sub(rf"s3://{BUCKET}/\S+", f"s3://{BUCKET}/{run_prefix}", cmd) + "".join(
        f" {shlex.quote(e)}" for e in extra
    )
    env = {k: v for k, v in cluster.client_env.items() if k != "RAY_AUTH_MODE"}  # the README line sets it itself
    if not wait:
        return subprocess.Popen(
            ["bash", "-c", cmd],
            cwd=job,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(["bash", "-c", cmd], cwd=job, env=env, capture_output=True, text=True, timeout=1200)


def tiny_cluster_config() -> dict:
    from tests.helpers import tiny_config

    tree = tiny_config(Path("unused"), Path("unused"))
    # The README line's run_dir=s3://... override sets it
    tree.pop("run_dir")
    tree.pop("ray")  # attach to the cluster as it is
    # The worker nodes cannot see the test's local files
    student = f"s3://{BUCKET}/models/student"
    tree["score"]["student"]["path"] = tree["teach"]["teachers"][0]["model"]["path"] = student
    t = tree["train"]
    # One worker per node: DeepSpeed over gloo between the two nodes
    t["num_workers"] = 2
    t["save_steps"] = 1
    t["phase2"] = {**t["phase2"], "max_steps": 12, "epochs": 12}  # long enough to be killed midway
    return tree


def test_readme_job_on_a_multinode_cluster_with_an_s3_run_dir_resumes_after_a_driver_kill(cluster, tmp_path):
    job = _job_dir(tmp_path, tiny_cluster_config())
    first = _submit(cluster, job, "run", wait=False)
    try:
        # Kill the driver (SIGKILL, by its PID as Ray reports it) once phase 2 has a checkpoint in S3
        # (phases 1 and 2 share one fit, named after phase 2, whose checkpoints carry their phase).
        deadline = time.time() + 900
        ckpts = "run/train/complexity_aware/phase2/checkpoints"
        while not cluster.s3_find(ckpts, "/phase2_step_"):
            assert first.poll() is None, f"the job ended before phase 2 checkpointed: {first.stdout.read()[-4000:]}"
            assert time.time() < deadline, "no phase-2 checkpoint in S3 after 15 minutes"
            time.sleep(0.5)
        (running,) = [j for j in cluster.jobs() if j["status"] == "RUNNING"]
        os.kill(int(running["driver_info"]["pid"]), signal.SIGKILL)
        first_out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            # The client this test started, not the job
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode != 0, first_out[-3000:]
    assert not cluster.s3_exists("run/train/complexity_aware/phase2/done.json")

    second = _submit(cluster, job, "run")
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in out, out[-5000:]
    manifest = cluster.s3_json("run/manifest.json")
    assert {s: e["status"] for s, e in manifest["stages"].items()} == {
        s: "done" for s in ("score", "split", "teach", "train", "eval", "report")
    }
    phase2 = cluster.s3_json("run/train/complexity_aware/phase2/metrics.json")
    assert phase2["resumed_from_step"] and phase2["resumed_from_step"] >= 1 and phase2["steps"] == 12, (
        phase2,
        out[-3000:],
    )  # from S3, not from 0
    assert "phase1: already trained" in " ".join(out.split())
    eval_metrics = cluster.s3_json("run/eval/metrics.json")
    assert list(eval_metrics["models"]) == [
        "base (single-token, from score)",
        "base",
        "complexity_aware/phase1",
        "complexity_aware/phase2",
    ]
    assert (
        eval_metrics["models"]["complexity_aware/phase2"]["adapter"]
        == f"s3://{BUCKET}/run/train/complexity_aware/phase2/model"
    )
    assert all(
        model_metrics["overall"]["n"] == eval_metrics["compared_rows"]
        for model_metrics in eval_metrics["models"].values()
    )
    assert cluster.s3_exists("run/report/report.html") and cluster.s3_exists("run/report/report.md")
    # Logs without a TTY: plain progress lines and rank 0's loss lines reach `ray job submit`'s output.
    assert "scoring: 0/" in out or "scoring:" in first_out
    assert "rows/s" in out + first_out
    assert re.search(r"train complexity_aware/phase2: step \d+/12 epoch \d+ loss [\d.]+", out), out[-5000:]
    # No stage leaves engines or training workers behind on the cluster.
    alive = cluster.alive_actors()
    assert not [a for a in alive if a.startswith(("MapWorker", "RayTrainWorker", "TrainController"))], alive

    # A full fine-tune next to it in the same run dir: eval loads the full model dir from S3.
    full = _submit(cluster, job, "run", "train.recipe=sft_all", "train.method=full")
    assert full.returncode == 0, (full.stdout + full.stderr)[-5000:]
    eval_metrics = cluster.s3_json("run/eval/metrics.json")
    model_metrics = eval_metrics["models"]["sft_all/phase1"]
    assert model_metrics["adapter"] is None and model_metrics["path"] == f"s3://{BUCKET}/run/train/sft_all/phase1/model"
    assert model_metrics["overall"]["n"] == 10

    # A study kept on the object store: the study file and its base there, and `--plan`'s cost table
    # reading tokens per row from this run's outputs in S3 (what a user checks before submitting it).
    base = tiny_cluster_config()
    study = {
        "base": "base.yaml",
        "run_dir": f"s3://{BUCKET}/studies/ratio",
        "axes": {"split.quantiles": [[0.25, 0.75], [0.25, 0.5]]},
        "scaling": {"reference": f"s3://{BUCKET}/run"},
    }
    for key, tree in (("studies/base.yaml", base), ("studies/s.yaml", {"study": study})):
        with cluster.s3.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(yaml.safe_dump(tree).encode())
    plan = subprocess.run(
        [str(BIN / "raycat"), "study", "--config", f"s3://{BUCKET}/studies/s.yaml", "--plan", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plan.returncode == 0, plan.stderr[-3000:]
    rows = json.loads(plan.stdout)
    assert [row["run_dir"].startswith(f"s3://{BUCKET}/studies/ratio/variants/") for row in rows] == [True, True]
    scored = cluster.s3_json("run/score/metrics.json")["scored"]
    for row in rows:
        assert {st["action"] for st in row["stages"].values()} == {"run"}
        # Measured: the reference scored the same data
        assert row["costs"]["questions"]["value"] == scored
        tokens = row["costs"]["stages"]["score"]["tokens"]
        assert tokens["value"] > 0 and f"s3://{BUCKET}/run" in tokens["basis"]
        assert "measured on" in row["costs"]["stages"]["train"]["tokens"]["basis"]
        assert row["memory"]["params"] > 0 and all(p["fits"] for p in row["memory"]["phases"].values())


def test_a_local_run_dir_is_refused_before_anything_runs(cluster, tmp_path):
    tree = tiny_cluster_config()
    job = _job_dir(tmp_path, tree)
    local = tmp_path / "local-run"
    result = _submit(cluster, job, "unused", f"run_dir={local}")
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0
    assert "pre-flight: run_dir" in out and "is a local path" in out and "2 other node(s)" in out, out[-3000:]
    # Refused before any stage wrote anything
    assert not local.exists()


def test_a_sharded_gzipped_corpus_on_an_s3_prefix_is_read_by_the_workers_scored_and_split(cluster, tmp_path):
    """200k rows in 8 .jsonl.gz shards under an s3:// prefix, one read task per shard on the worker
    nodes; a duplicate id split over two shards and bad rows in two others land in one quarantine."""
    import gzip

    import pyarrow.parquet as pq

    started = time.time()
    shards, per = 8, 25_000
    for s in range(shards):
        ids = range(s * per, (s + 1) * per)
        # 2 to 4 options: the null engine's uniform scores then differ by row, so split has bands.
        lines = [
            f'{{"qid": "q{i}", "question": "Q{i}?", "options": {json.dumps(["a", "b", "c", "d"][: 2 + i % 3])}, '
            f'"answer": "B"}}'
            for i in ids
        ]
        if s == 0:
            lines[-1] = lines[-1].replace(f'"q{per - 1}"', '"dup"')
        if s == 5:
            lines[3] = lines[3].replace(f'"q{5 * per + 3}"', '"dup"')
        if s == 2:
            lines[7] = lines[7].replace('"answer": "B"', '"answer": "Z"')
        if s == 6:
            lines[11] = '{"qid": "cut off'
        # compression=None: pyarrow would otherwise gzip a .gz name a second time
        with cluster.s3.open_output_stream(f"{BUCKET}/corpus/part-{s:02d}.jsonl.gz", compression=None) as f:
            f.write(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1))
    written = time.time()
    tree = {
        "data": {
            "source": "generic",
            "path": f"s3://{BUCKET}/corpus/",
            "columns": {"id": "qid", "question": "question", "options": "options", "answer": "answer"},
            "on_bad_rows": "quarantine",
        },
        "score": {
            "student": {"path": f"s3://{BUCKET}/models/student", "max_model_len": 512},
            "deviation_sample": 0,
            "engine": {"backend": "null", "batch_size": 1024},
        },
        "split": {"test_fraction": 0.1},
    }
    job = tmp_path / "job"
    job.mkdir()
    (job / "corpus.yaml").write_text(yaml.safe_dump(tree))
    run = f"s3://{BUCKET}/corpus-run"
    for stage in ("score", "split"):
        r = cluster.ray(
            *("job", "submit", "--address", cluster.dashboard, "--working-dir", str(job), "--"),
            *("raycat", stage, "--config", "corpus.yaml", f"run_dir={run}"),
            timeout=1200,
        )
        assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-5000:]
    summary = cluster.s3_json("corpus-run/questions/summary.json")
    assert (summary["rows_read"], summary["valid"], summary["selected"]) == (200_000, 199_997, 199_997)
    reasons = summary["quarantine_reasons"]
    assert summary["quarantined"] == 3 and len(reasons) == 3
    assert reasons["answer: gold 'Z' is not among the option letters 'AB'"] == reasons["id: duplicate id 'dup'"] == 1
    assert [k for k in reasons if k.startswith("(line): not valid JSON")]
    with cluster.s3.open_input_stream(f"{BUCKET}/corpus-run/questions/quarantine.jsonl") as f:
        quarantine = [json.loads(line) for line in f.read().decode().splitlines()]
    assert [q["row"] for q in quarantine] == ["part-02.jsonl.gz:7", "part-05.jsonl.gz:3", "part-06.jsonl.gz line 12"]
    assert quarantine[1]["reason"] == f"duplicate id 'dup' (first seen at row part-00.jsonl.gz:{per - 1})"
    with cluster.s3.open_input_file(f"{BUCKET}/corpus-run/questions/questions.parquet") as f:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == 199_997 and meta.row_group(0).num_rows == 8192  # rundir.group_rows(4 x 1024)
    assert cluster.s3_json("corpus-run/score/metrics.json")["scored"] == 199_997
    split_rows = 0
    for band in ("easy", "medium", "hard", "test"):
        with cluster.s3.open_input_file(f"{BUCKET}/corpus-run/split/{band}.parquet") as f:
            split_rows += pq.ParquetFile(f).metadata.num_rows
    assert split_rows == 199_997
    print(f"corpus written in {written - started:.0f} s; score + split {time.time() - written:.0f} s")
