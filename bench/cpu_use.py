"""Where a machine's CPU went while a bench ran: CPU seconds per process group of this process's tree
(Ray Train workers, Ray's other actors, Ray's daemons, the driver), sampled in a thread, read over a
window (e.g. the training steps after the first). On a machine with as many cores as workers, anything
besides the workers takes CPU from a worker, and a data-parallel step waits for its slowest rank."""

from __future__ import annotations

import threading
import time


def _group(cmdline: str) -> str:
    if "RayTrainWorker" in cmdline:
        return "train workers"
    if cmdline.startswith("ray::"):  # Ray retitles a worker process after the actor or task it runs
        return cmdline.split(" ", 1)[0]
    exe = cmdline.split(" ", 1)[0]
    if exe.endswith(("raylet", "gcs_server")) or any(d in cmdline for d in ("dashboard", "log_monitor", "monitor.py")):
        return "Ray daemons"
    if "default_worker.py" in cmdline:
        return "idle Ray workers"
    return "other"


class CpuSampler:
    """``with CpuSampler() as s: ...``; then ``s.window(t0, t1)`` -> {group: CPU seconds in [t0, t1]}."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            now, row = time.time(), {me.pid: ("driver", sum(me.cpu_times()[:2]))}
            for p in me.children(recursive=True):
                try:  # the title is read each time: a worker is retitled once it runs an actor
                    row[p.pid] = (_group(" ".join(p.cmdline())), sum(p.cpu_times()[:2]))
                except Exception:  # exited between listing and reading
                    pass
            self.samples.append((now, row))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per group between the last sample at or before t0 and the first at or after t1
        (a process seen only inside the window counts from its first sample)."""
        before = [r for t, r in self.samples if t <= t0]
        after = [r for t, r in self.samples if t >= t1] or [self.samples[-1][1]]
        start, end = (before[-1] if before else {}), after[0]
        inside = [r for t, r in self.samples if t0 < t < t1]
        out: dict[str, float] = {}
        for pid, (group, cpu) in end.items():
            first = start.get(pid) or next((r[pid] for r in inside if pid in r), (group, cpu))
            out[group] = out.get(group, 0.0) + cpu - first[1]
        return out
