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
    """``with CpuSampler() as s: ...``; then ``s.window(t0, t1)`` -> ({group: CPU seconds}, span seconds).
    Processes are keyed by (pid, start time), so a reused pid is another process."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            now, row = time.time(), {}
            for p in [me, *me.children(recursive=True)]:
                try:  # the title is read each time: a worker is retitled once it runs an actor
                    group = "driver" if p.pid == me.pid else _group(" ".join(p.cmdline()))
                    row[(p.pid, p.create_time())] = (group, sum(p.cpu_times()[:2]))
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

    def window(self, t0: float, t1: float) -> tuple[dict[str, float], float]:
        """CPU seconds per group from the last sample at or before t0 to the first at or after t1, and
        that span (divide by it, not by t1 - t0). A process that starts or exits inside counts from its
        first to its last sample there."""
        times = [t for t, _ in self.samples]
        i0 = max([i for i, t in enumerate(times) if t <= t0], default=0)
        i1 = min([i for i, t in enumerate(times) if t >= t1], default=len(times) - 1)
        first: dict = {}
        last: dict = {}
        for _, row in self.samples[i0 : i1 + 1]:
            for key, value in row.items():
                first.setdefault(key, value)
                last[key] = value
        out: dict[str, float] = {}
        for key, (group, cpu) in last.items():
            out[group] = out.get(group, 0.0) + cpu - first[key][1]
        return out, times[i1] - times[i0]
