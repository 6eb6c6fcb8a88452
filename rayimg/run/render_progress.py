"""The render job's progress: the counts its actors report (:class:`Progress`, a Ray actor in
the job) and the driver's progress lines (:class:`Reporter`)."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["Progress", "Reporter", "format_progress", "steady_rate"]


class Progress:
    """Row counts reported by render actors (wrapped as a Ray actor by :func:`run`).

    Actors call ``report`` after each engine batch; the driver polls ``snapshot``. Counts are
    also published as Ray metrics (``rayimg_render_rows_done``, ``rayimg_render_rows_total``,
    ``rayimg_render_images_per_s``) for the dashboard. A unit re-run after an actor dies
    reports its already-written rows again as skipped, so live counts may run slightly ahead
    of the final summary, which counts each row once."""

    def __init__(self, total: int | None, job_name: str):
        """``total``: the valid rows, or None when the validation stage reports them
        (:meth:`validated`, counted as the batches are checked)."""
        self.total = total or 0
        self.counting = total is None
        self.batches: set[str] = set()  # validated batches counted (by their row ids)
        self.bad_rows = 0
        self.split_at: float | None = None  # when the first work unit reached an actor (the total is final)
        self.validated_at: float | None = None  # when the last validation batch was counted
        self.warm_ups: list[dict] = []  # the actors' warm-ups: shape, seconds, when ready
        self.rendered = 0
        self.skipped = 0
        self.per_actor: dict[str, int] = {}
        self.first: float | None = None  # when the first engine batch was written
        self.last: float | None = None
        self.rendered_at_first = 0  # images of the first report: the steady rate counts what came after
        self.cache: dict[str, int] = {}  # compile-cache event counts of every actor (loaded, cold, saved, ignored)
        self.started = time.time()
        self.metrics = None
        try:
            from ray.util.metrics import Counter, Gauge

            tags = {"job": job_name}
            done = Counter("rayimg_render_rows_done", description="catalog rows rendered or found written", tag_keys=("job", "kind"))
            done.set_default_tags(tags)
            total_g = Gauge("rayimg_render_rows_total", description="valid catalog rows of the job", tag_keys=("job",))
            total_g.set_default_tags(tags)
            rate = Gauge("rayimg_render_images_per_s", description="images rendered per second", tag_keys=("job",))
            rate.set_default_tags(tags)
            total_g.set(self.total)
            self.metrics = (done, rate, total_g)
        except Exception:
            pass

    def validated(self, batch: str, valid: int, bad: int) -> None:
        """A validation batch's counts; ``batch`` names it, so one checked again counts once."""
        if not self.counting or batch in self.batches:
            return
        self.batches.add(batch)
        self.validated_at = time.time()
        self.total += valid
        self.bad_rows += bad
        if self.metrics is not None:
            try:
                self.metrics[2].set(self.total)
            except Exception:
                pass

    def warmed_up(self, actor: str, shape: list, seconds: float) -> None:
        self.warm_ups.append({"actor": actor, "shape": list(shape), "seconds": round(seconds, 2), "at": time.time()})

    def units_started(self) -> None:
        if self.split_at is None:
            self.split_at = time.time()

    def report(self, actor: str, rendered: int, skipped: int, at: float | None = None) -> None:
        """``at``: when these rows were written (default: now). Batches may report out of order:
        the first and last times are the earliest and latest written."""
        now = time.time() if at is None else at
        if rendered:
            if self.first is None or now < self.first:
                self.first, self.rendered_at_first = now, rendered
            elif now == self.first:
                self.rendered_at_first += rendered
            if self.last is None or now > self.last:
                self.last = now
        self.rendered += rendered
        self.skipped += skipped
        self.per_actor[actor] = self.per_actor.get(actor, 0) + rendered + skipped
        if self.metrics is not None:
            done, rate, _ = self.metrics
            try:
                if rendered:
                    done.inc(rendered, tags={"kind": "rendered"})
                if skipped:
                    done.inc(skipped, tags={"kind": "skipped"})
                rate.set(steady_rate(self.snapshot()) or 0.0)
            except Exception:
                pass

    def cache_events(self, actions: list[str]) -> None:
        for action in actions:
            self.cache[action] = self.cache.get(action, 0) + 1

    def snapshot(self) -> dict:
        return {"total": self.total, "bad_rows": self.bad_rows, "split_at": self.split_at, "validated_at": self.validated_at,
                "warm_ups": list(self.warm_ups), "rendered": self.rendered, "skipped": self.skipped, "per_actor": dict(self.per_actor),
                "compile_cache": dict(self.cache), "first": self.first, "last": self.last, "rendered_at_first": self.rendered_at_first, "now": time.time()}


def steady_rate(snap: dict) -> float | None:
    """Images/s from the first written batch to the last one (start-up and compile excluded);
    None before two batches a second or more apart."""
    if snap["first"] is None or snap["last"] is None or snap["last"] - snap["first"] < 1.0:
        return None  # under a second between batches says nothing steady
    return (snap["rendered"] - snap["rendered_at_first"]) / (snap["last"] - snap["first"])


def format_progress(snap: dict, started: float) -> str:
    """``rows done/total, images/s, ETA, per-actor counts`` from a :class:`Progress` snapshot; the
    rate counts from the first image on (start-up and compile time are not rendering time)."""
    done = min(snap["rendered"] + snap["skipped"], snap["total"])
    rate = steady_rate(snap)
    if rate is None:
        elapsed = snap["now"] - started
        rate = snap["rendered"] / elapsed if elapsed > 0 else 0.0
    left = max(snap["total"] - done, 0)
    eta = f"{left / rate:.0f}s" if rate > 0 else "?"
    actors = ", ".join(f"{a}: {n}" for a, n in sorted(snap["per_actor"].items()))
    return (f"[render] {done}/{snap['total']} rows done ({snap['rendered']} rendered, {snap['skipped']} already there), "
            f"{rate:.2f} images/s, ETA {eta}; actors {actors or '-'}")


class Reporter:
    """A driver thread that polls the Progress actor and prints a line at least every
    ``interval`` seconds from the first row written (or found written) on: one updating line on
    a terminal, plain lines otherwise."""

    def __init__(self, progress, interval: float, started: float, split_line: Callable[[dict], str] | None = None):
        """``split_line``: the line printed once the catalog is validated and split (the first
        snapshot with ``split_at``), from that snapshot."""
        import sys
        import threading

        self.progress, self.interval, self.started = progress, interval, started
        self.split_line = split_line
        self.tty = sys.stdout.isatty()
        self.stop = threading.Event()
        self.last: dict | None = None
        self.thread = threading.Thread(target=self._loop, name="rayimg-render-progress", daemon=True)
        self.thread.start()

    def poll(self) -> dict | None:
        import ray

        try:
            self.last = ray.get(self.progress.snapshot.remote(), timeout=30)
        except Exception:  # the progress actor restarting or busy: keep the last snapshot
            pass
        return self.last

    def _print(self, snap: dict) -> None:
        line = format_progress(snap, self.started)
        if self.tty:
            print("\r" + line + "\x1b[K", end="", flush=True)
        else:
            print(line, flush=True)

    def _loop(self) -> None:
        printed = 0.0
        while not self.stop.wait(min(2.0, self.interval)):
            snap = self.poll()
            if snap is not None and snap.get("split_at") and self.split_line is not None:
                self.split(snap)
            if snap is None or not snap["rendered"] + snap["skipped"]:
                continue  # nothing written or found yet
            now = time.perf_counter()
            if printed == 0.0 or now - printed >= self.interval:
                printed = now
                self._print(snap)

    def split(self, snap: dict) -> None:
        """The split line, once (also from :meth:`close`: a job with nothing to render never splits)."""
        line, self.split_line = self.split_line, None
        if line is not None:
            print(("\r\x1b[K" if self.tty else "") + line(snap), flush=True)

    def close(self) -> dict | None:
        self.stop.set()
        self.thread.join(timeout=35)
        snap = self.poll()
        if snap is not None:
            self.split(snap)
        if self.tty and snap is not None and snap["rendered"] + snap["skipped"]:
            self._print(snap)
            print(flush=True)
        return snap
