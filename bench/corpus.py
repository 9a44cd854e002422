"""Driver memory and throughput of `raycat score` as the corpus grows, with a null engine.

    python bench/corpus.py                      # 10k, 100k and 1M rows
    python bench/corpus.py --sizes 10000 100000

The engine loads no model (``score.engine.backend: null``: uniform option scores), so what is measured
is raycat's data plane around it: reading and validating the corpus, rendering prompts with a real
chat template (the tiny test tokenizer), the Ray Data pipeline, writing parts, merging and metrics.
Each size runs in a fresh process (a local Ray with 2 CPUs); its peak resident memory (the driver
process alone: Ray's workers are other processes) and rows/s are reported, and the ratio of each
size's driver peak to the smallest one's. Flat driver memory means the ratio stays near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from raycat.config import validate_config
from raycat.score import stage as score
cfg = validate_config(json.loads(sys.argv[1]))
t = time.time()
m = score.run(cfg)
print("RESULT " + json.dumps({"wall_s": time.time() - t, "rows": m["rows_this_run"],
      "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_corpus(path: Path, n: int) -> None:
    """A generic JSONL corpus: MMLU-sized questions (~300 characters) with 4 options."""
    with path.open("w") as f:
        for i in range(n):
            q = f"Question {i}: " + "which of the following statements about the system is correct? " * 4
            row = {"qid": f"q{i}", "question": q, "options": [f"option {j} of {i}" for j in range(4)], "answer": "B"}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    from raycat.testing.tiny_models import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="raycat-corpus-"))
    model = build_tiny_model(work / "model")
    results = []
    for n in args.sizes:
        corpus = work / f"corpus-{n}.jsonl"
        t = time.time()
        write_corpus(corpus, n)
        tree = {
            "run_dir": str(work / f"run-{n}"),
            "data": {
                "source": "generic",
                "path": str(corpus),
                "columns": {"id": "qid", "question": "question", "options": "options", "answer": "answer"},
                "answer_format": "letter",
            },
            "score": {
                "student": {"path": str(model), "max_model_len": 512},
                "deviation_sample": 0,
                "engine": {"backend": "null", "batch_size": 512},
            },
            "ray": {"num_cpus": 2},
        }
        env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        r = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(tree)], capture_output=True, text=True, env=env, timeout=7200
        )
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            sys.exit(f"size {n} failed:\n{r.stderr[-4000:]}")
        res = json.loads(line[-1].removeprefix("RESULT "))
        res.update(n=n, corpus_write_s=round(time.time() - t - res["wall_s"], 1))
        results.append(res)
        base = results[0]["driver_peak_mib"]
        print(
            f"{n:>9} rows: driver peak {res['driver_peak_mib']:7.0f} MiB (x{res['driver_peak_mib'] / base:.2f} "
            f"of {results[0]['n']} rows), {res['rows'] / res['wall_s']:8.0f} rows/s, score.run {res['wall_s']:.0f} s",
            flush=True,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
