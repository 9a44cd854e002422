"""What a reader of questions.parquet pays for the file's footer, by row-group layout.

    python bench/footer.py                      # 1M and 2M rows
    python bench/footer.py --sizes 100000 --json bench/results/footer.json

Every process that opens a Parquet file parses its whole footer, which holds metadata for every row
group. With row groups of one pipeline block (``4 x batch_size`` = 128 rows at the default batch of
32) the footer grows with the corpus, and the score pipeline made one read task per row group: each
task parsed all of it. The layout raycat writes now (``rundir.group_rows``: row groups of at least
8192 rows, a read task per ~8192 rows, ``rundir.READ_ROWS``) is measured beside it, in the same run.

For each size a questions-like file (MMLU-sized rows: ~300-character questions, 4 options, a 64-hex
row hash) is written once per layout to a temp dir, then a fresh Python process opens it and reports
the footer's size, the time to parse it (median of 5) and the memory the parsed footer holds (RssAnon
before and after). "read tasks" is how many tasks the pipeline's read makes; "parse work" is read
tasks x parse time: the CPU the whole read spends on footers. Nothing here uses Ray.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 128  # 4 x the default engine batch_size (32): the old row group


def write(path: Path, n: int, group: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycat.data.parallel import SCHEMA

    words = "the of and a to in is was that for on are with as by at from which an be this".split()
    text = [" ".join(words[(i * 7 + k) % len(words)] for k in range(55)) for i in range(1000)]
    with pq.ParquetWriter(path, SCHEMA) as writer:
        for start in range(0, n, 65536):
            k = min(65536, n - start)
            rows = range(start, start + k)
            table = pa.table(
                {
                    "id": [f"q{i:09d}" for i in rows],
                    "question": [f"{text[i % 1000]} ({i})" for i in rows],
                    "options": [[f"option {j} of {i}" for j in "ABCD"] for i in rows],
                    "gold": ["ABCD"[i % 4] for i in rows],
                    "category": [f"subject {i % 57}" for i in rows],
                    "source": ["bench"] * k,
                    "row_hash": [f"{i:064x}" for i in rows],
                },
                schema=SCHEMA,
            )
            writer.write_table(table, row_group_size=group)


PROBE = """
import json, sys, time
import pyarrow.parquet as pq
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
before = anon()
meta = pq.ParquetFile(sys.argv[1]).metadata
held = anon() - before
times = []
for _ in range(5):
    t = time.perf_counter()
    pq.ParquetFile(sys.argv[1]).metadata
    times.append(time.perf_counter() - t)
print(json.dumps({"row_groups": meta.num_row_groups, "footer_bytes": meta.serialized_size,
                  "parse_s": sorted(times)[2], "footer_mib": held}))
"""


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> None:
    from raycat.storage import rundir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    layouts = {"row group = block (old)": BLOCK, "row group >= 8192 (now)": rundir.group_rows(BLOCK)}
    results = []
    print(
        f"{'rows':>10}  {'layout':<24} {'groups':>7} {'footer KiB':>10} {'parse ms':>9} {'held MiB':>9} "
        f"{'read tasks':>10} {'parse work s':>12}"
    )
    with tempfile.TemporaryDirectory(prefix="raycat-footer-") as tmp:
        for n in args.sizes:
            for name, group in layouts.items():
                path = Path(tmp) / f"q-{n}-{group}.parquet"
                started = time.time()
                write(path, n, group)
                m = measure(path)
                counts = rundir.row_group_rows(str(path))
                # Old: one read task per row group; now: one per ~READ_ROWS rows.
                tasks = len(counts) if group == BLOCK else len(rundir.read_spans(counts, rundir.READ_ROWS))
                row = {"rows": n, "layout": name, **m, "read_tasks": tasks, "parse_work_s": tasks * m["parse_s"]}
                row["write_s"] = round(time.time() - started, 1)
                results.append(row)
                print(
                    f"{n:>10,}  {name:<24} {m['row_groups']:>7,} {m['footer_bytes'] / 1024:>10,.0f} "
                    f"{m['parse_s'] * 1000:>9.1f} {m['footer_mib']:>9.1f} {tasks:>10,} {row['parse_work_s']:>12.1f}"
                )
                path.unlink()
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version.split()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
