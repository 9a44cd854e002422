"""vLLM's engine statistics on Ray's Prometheus endpoint, scraped while a real scoring run goes on:
what the Ray dashboard, Grafana and cluster/kuberay/podmonitor.yaml's Prometheus read."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raycat.cli import main
from tests.helpers import make_corpus

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

TOKENS = "ray_vllm_prompt_tokens_total"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(text: str) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every sample of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


@contextlib.contextmanager
def scraping(url: str, every_s: float = 0.5):
    """Scrape ``url`` in a thread until the block ends; yields {name: [(labels, value), ...]} of every
    ray_vllm_* sample seen. Gauges leave the page two report intervals after their last update (Ray's
    metrics agent), so the page is read during the run, not after it."""
    seen: dict[str, list[tuple[dict, float]]] = {}
    stop = threading.Event()

    def poll():
        while not stop.wait(every_s):
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                continue  # the agent may still be starting
            for name, labels, value in _samples(text):
                if name.startswith("ray_vllm_"):
                    seen.setdefault(name, []).append((labels, value))

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def _score_config(tmp_path: Path, model: Path) -> Path:
    columns = {"id": "qid", "question": "question", "options": "options", "answer": "answer", "category": "topic"}
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "generic", "path": str(make_corpus(tmp_path / "corpus.jsonl")), "columns": columns},
        "score": {
            "student": {"path": str(model), "dtype": "float32", "max_model_len": 512},
            "deviation_sample": 0,
            "engine": {"batch_size": 8, "kv_cache_gib": 0.25},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def ray_with_metrics_port():
    """A local Ray whose metrics agent serves Prometheus on a known loopback port, reporting every
    second (the default is 10 s); `raycat score` attaches to it."""
    import ray

    port = _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        ray.shutdown()


def test_a_scoring_run_exports_the_engines_statistics_to_rays_prometheus_endpoint(
    ray_with_metrics_port, tmp_path, tiny_model_dir
):
    config = _score_config(tmp_path, tiny_model_dir)
    with scraping(ray_with_metrics_port) as seen:
        assert main(["score", "--config", str(config)]) == 0
    assert TOKENS in seen, sorted(seen)
    # The engine's prompt-token counter, labelled with the model it serves
    assert max(value for _, value in seen[TOKENS]) > 0
    assert {labels["model_name"] for labels, _ in seen[TOKENS]} == {str(tiny_model_dir)}
    # The gauges an operator watches: KV cache use and the scheduler's queue
    for gauge in ("ray_vllm_kv_cache_usage_perc", "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting"):
        assert gauge in seen, (gauge, sorted(seen))


def _tokens_from(url: str, worker_id: str) -> float:
    """The prompt tokens this Ray worker's engines have reported (0 before any)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(v for name, labels, v in _samples(text) if name == TOKENS and labels.get("WorkerId") == worker_id)


def _wait_for_more_tokens(url: str, worker_id: str, than: float, timeout_s: float = 15) -> float:
    deadline = time.time() + timeout_s
    while (now := _tokens_from(url, worker_id)) <= than:
        assert time.time() < deadline, f"{TOKENS} of worker {worker_id} stayed at {now}"
        time.sleep(0.5)
    return now


def test_a_second_engine_in_the_same_process_keeps_exporting(ray_with_metrics_port, tiny_model_dir):
    """Ray metrics are registered per process, by name: a second engine (a test, a stage that builds
    one after another in the same process) records into the same series instead of failing."""
    import ray

    from raycat.engines.base import Sampling
    from raycat.engines.vllm_engine import VLLMEngine

    me = ray.get_runtime_context().get_worker_id()
    tokens = _tokens_from(ray_with_metrics_port, me)
    for _ in range(2):
        engine = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25)
        try:
            engine.generate([[1, 2, 3, 4, 5]], Sampling(temperature=0.0, top_p=1.0, max_tokens=2, seed=0))
        finally:
            engine.close()
        tokens = _wait_for_more_tokens(ray_with_metrics_port, me, tokens)
