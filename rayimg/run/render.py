"""`rayimg render`: bulk rendering of a prompt catalog with Ray Data — resumable, exactly once.

    catalog (JSONL/CSV/Parquet, streamed) -> validate rows (tasks; bad rows to errors/)
      -> sort by (adapters, size, steps, scheduler) so actors swap adapters rarely
      -> render (actor pool, GPU actors on a cluster): skip keys already written, write PNGs
         atomically, then the batch's manifest part -> manifest.parquet + errors.jsonl

An image's path is its output key (``images/<key>.png``): the same row always maps to the same
file, a re-run skips keys already there, and a PNG is either absent or complete (atomic write).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import numpy as np

from rayimg.config import RenderJob, absolute_paths
from rayimg.run.catalog_source import FILE_COL, LINE_COL, TEXT_COL, _ext_format, catalog_preview, parse_catalog_line, read_catalog
from rayimg.run.manifest import finalize, manifest_row, write_errors, write_manifest_part
from rayimg.storage import Storage, join

VALIDATE_BATCH = 256


# --------------------------------------------------------------------------- stage 1: validate
class Validate:
    """Normalises rows; bad ones go to ``errors/`` with their reason."""

    def __init__(self, job: RenderJob, adapters: dict[str, list[str]], base: tuple[str, str, str | None] | None = None,
                 progress=None):
        """``progress``: a :class:`Progress` actor handle told each batch's count of valid rows
        (the job's total is known only once every batch is validated)."""
        self.job = job
        self.progress = progress
        self.adapters = adapters  # name -> versions, from the registry at job start
        self.base = base  # (family, model id, model hash) of the job's model, for check_adapter
        self.problems: dict[tuple[str, str], str | None] = {}  # (name, version) -> reason it cannot be used
        self.storage = Storage(job.storage)

    def _problem(self, name: str, version: str) -> str | None:
        """Why adapter ``name`` at ``version`` cannot be applied to the job's model (None: it can);
        its adapter.json is read once per task."""
        from rayimg.registry import RegistryError, check_published

        if self.base is None:
            return None
        if (name, version) not in self.problems:
            family, model_id, model_hash = self.base
            try:
                warning = check_published(self.storage, self.job.registry, name, version, family=family, model_id=model_id, model_hash=model_hash)
                if warning:
                    print(f"[render] warning: {warning}", flush=True)
                self.problems[(name, version)] = None
            except RegistryError as e:
                self.problems[(name, version)] = str(e)
        return self.problems[(name, version)]

    def _resolve(self, refs) -> list[tuple[str, str, float]]:
        from rayimg.render.catalog import RowError

        out = []
        for ref in refs:
            versions = self.adapters.get(ref.name)
            if not versions:
                raise RowError(f"unknown adapter {ref.name!r}")
            version = ref.version or versions[-1]
            if version not in versions:
                raise RowError(f"adapter {ref.name!r} has no version {version!r} (have {', '.join(versions)})")
            if (problem := self._problem(ref.name, version)) is not None:
                raise RowError(problem)
            out.append((ref.name, version, ref.scale))
        return out

    def __call__(self, batch: dict) -> dict:
        from rayimg.render.catalog import RowError, normalize_row, row_id

        n = len(next(iter(batch.values()))) if batch else 0
        good: dict[str, list] = {"row_id": [], "group": [], "settings": []}
        errors = []
        lines = TEXT_COL in batch  # a JSON Lines catalog: raw lines, parsed here (see read_catalog)
        for i in range(n):
            if lines:
                raw, line, name = bytes(batch[TEXT_COL][i]), int(batch[LINE_COL][i]), str(batch[FILE_COL][i])
                try:
                    row = parse_catalog_line(raw, line)
                except RowError as e:
                    text = raw[:8000].decode("utf-8", errors="replace")[:2000]
                    errors.append({"row_id": f"{name}:{line}", "reason": str(e), "row": {"line": line, "text": text}})
                    continue
            else:
                row = {k: _plain(v[i]) for k, v in batch.items()}
            rid = row_id(row)
            try:
                s = normalize_row(row, self.job.defaults, self.job.limits)
                s["adapters"] = self._resolve(s["adapters"])
            except RowError as e:
                errors.append({"row_id": rid, "reason": str(e), "row": row})
                continue
            group = json.dumps([s["adapters"], s["width"], s["height"], s["steps"], s["scheduler"], s["guidance_scale"]])
            good["row_id"].append(rid)
            good["group"].append(group)
            good["settings"].append(json.dumps(s))
        write_errors(self.storage, self.job.output.uri, errors)
        if self.progress is not None:
            import ray

            ids = good["row_id"] + [e["row_id"] for e in errors]
            # a batch validated again (a lost block rebuilt by Ray) has the same ids: counted once
            key = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:24]
            try:
                ray.get(self.progress.validated.remote(key, len(good["row_id"]), len(errors)), timeout=60)
            except Exception:  # progress is advisory: never fail a batch over it
                pass
        return good


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --------------------------------------------------------------------------- stage 2: render
class RenderRows:
    """An actor holding the model; renders each batch grouped by batch key."""

    def __init__(self, job: RenderJob, progress=None, job_started: float | None = None, warm: tuple[int, int, float] | None = None):
        """``job_started``: the job's start (``time.time()``), for the start-up lines. ``warm``:
        ``(width, height, guidance_scale)`` of the engine batch to compile (or load from the
        compile cache) before the first unit comes, while the catalog is still being validated
        and sorted (:meth:`Renderer.warm_up`)."""
        from rayimg.registry import AdapterStore
        from rayimg.render.renderer import Renderer

        self.job = job
        self.progress = progress  # a Progress actor handle, or None
        self.label = _actor_label()
        self.storage = Storage(job.storage)
        store = AdapterStore(self.storage, job.registry)
        self.renderer = Renderer(job.model, job.engine, self.storage, adapter_store=store, compile_cache=join(job.output.uri, ".compile-cache"))
        store.unet_config = self.renderer.pipe.unet.config
        startup = self.renderer.startup
        since = f" (ready {time.time() - job_started:.1f}s after the job started)" if job_started else ""
        print(f"[render actor {self.label}] model loaded in {startup['model_load_s']:.1f}s, engine set up in "
              f"{startup['engine_setup_s']:.1f}s{since}", flush=True)
        self._cache_events_sent = 0
        self._started_units = False
        if warm is not None:
            try:
                seconds = self.renderer.warm_up(*warm)
            except Exception as e:  # noqa: BLE001 - the first unit compiles what it needs, as without a warm-up
                seconds = None
                print(f"[render actor {self.label}] WARNING: warm-up of {warm[0]}x{warm[1]} failed ({type(e).__name__}: {e}); "
                      "the first unit compiles its shapes", flush=True)
            if seconds is not None:
                since = f" (ready {time.time() - job_started:.1f}s after the job started)" if job_started else ""
                actions = [e["action"] for e in self.renderer.compile_cache_status]
                cache = f"; compile cache: {', '.join(actions)}" if actions else ""
                print(f"[render actor {self.label}] warmed up {warm[0]}x{warm[1]} in {seconds:.1f}s{cache}{since}", flush=True)
                self._report_cache()
                if self.progress is not None:
                    try:
                        self.progress.warmed_up.remote(self.label, list(warm), seconds)
                    except Exception:
                        pass

    def __call__(self, batch: dict) -> dict:
        from rayimg.render.engine import GenerationRequest

        if not self._started_units and self.progress is not None:
            self._started_units = True
            try:  # a unit exists only once the catalog is validated and sorted: the total is final
                self.progress.units_started.remote()
            except Exception:
                pass
        rows = [(str(r), json.loads(s)) for r, s in zip(batch["row_id"], batch["settings"])]
        groups: dict[tuple, list] = {}
        for rid, s in rows:
            req = GenerationRequest(prompt=s["prompt"], negative_prompt=s["negative_prompt"], steps=s["steps"],
                                    guidance_scale=s["guidance_scale"], width=s["width"], height=s["height"],
                                    scheduler=s["scheduler"], seed=s["seed"], adapters=tuple(tuple(a) for a in s["adapters"]))
            groups.setdefault(req.batch_key(), []).append((rid, req))
        manifest, out = [], {"row_id": [], "rendered": []}
        chunks, paths = [], {}
        n_skipped = 0
        bs = self.job.engine.batch_size
        for _key, items in sorted(groups.items(), key=lambda kv: repr(kv[0])):
            todo = []
            for rid, req in items:
                key = self.renderer.key(req)
                path = join(self.job.output.uri, "images", f"{key}.png")
                if self.storage.exists(path):  # written by an earlier (maybe killed) run or actor
                    manifest.append(manifest_row(rid, key, path, req, None))
                    out["row_id"].append(rid)
                    out["rendered"].append(False)
                    n_skipped += 1
                else:
                    todo.append(req)
                    paths[id(req)] = (rid, key, path)
            chunks += [todo[start:start + bs] for start in range(0, len(todo), bs)]

        def write(req, image):  # in the renderer's encoder thread, beside the next batch
            rid, key, path = paths[id(req)]
            assert image.key == key
            self.storage.write_bytes(path, image.png)
            return rid, key, path, req, time.time()

        if n_skipped:
            self._report(0, n_skipped)
        # one stream over every group: the next group's adapters load while this one renders.
        # An adapter that fails to load (despite validation: e.g. corrupt weights) sends the rows
        # naming it to errors/ and the stream goes on with the other groups.
        from rayimg.registry import AdapterCorrupt, RegistryError
        from rayimg.render.adapters import LoraError

        while chunks:
            done = 0
            try:
                for results in self.renderer.render_stream(chunks, sink=write):
                    done += 1
                    for image, (rid, key, path, req, _) in results:
                        manifest.append(manifest_row(rid, key, path, req, image.seconds))
                        out["row_id"].append(rid)
                        out["rendered"].append(True)
                    # per engine batch, stamped when its PNGs were written (the stream hands a
                    # batch over only once the next one is queued, which can be a batch later)
                    self._report(len(results), 0, at=max(r[1][-1] for r in results))
                    self._report_cache()
                chunks = []
            except (LoraError, RegistryError, AdapterCorrupt) as e:  # raised by chunks[done]'s adapter swap
                failed = chunks[done][0].adapters
                settings = dict(rows)
                write_errors(self.storage, self.job.output.uri, [
                    {"row_id": paths[id(req)][0], "reason": f"adapter could not be loaded: {e}", "row": settings[paths[id(req)][0]]}
                    for chunk in chunks[done:] if chunk[0].adapters == failed for req in chunk])
                chunks = [chunk for chunk in chunks[done + 1:] if chunk[0].adapters != failed]
        if manifest:
            write_manifest_part(self.storage, self.job.output.uri, manifest)
        return out

    def _report_cache(self) -> None:
        """New compile-cache events (loaded / cold / saved / ignored) to the Progress actor."""
        events = self.renderer.compile_cache_status
        if self.progress is not None and len(events) > self._cache_events_sent:
            try:
                self.progress.cache_events.remote([e["action"] for e in events[self._cache_events_sent:]])
                self._cache_events_sent = len(events)
            except Exception:
                pass

    def _report(self, rendered: int, skipped: int, at: float | None = None) -> None:
        if self.progress is not None:
            try:
                self.progress.report.remote(self.label, rendered, skipped, at)  # fire and forget
            except Exception:  # progress is advisory: never fail a unit over it
                pass


def _render_rows_for(job: RenderJob, progress, job_started: float | None = None, warm: tuple[int, int, float] | None = None):
    """RenderRows bound to this job: the arguments travel with the class, not as constructor
    arguments in the object store (which a restarted actor could find gone)."""

    class JobRenderRows(RenderRows):
        def __init__(self):
            super().__init__(job, progress, job_started, warm)

    JobRenderRows.__name__ = JobRenderRows.__qualname__ = "RenderRows"
    return JobRenderRows


def _actor_label() -> str:
    """A short, restart-stable name for the current render actor (its actor id)."""
    try:
        import ray

        aid = ray.get_runtime_context().get_actor_id()
        return aid[:8] if aid else "local"
    except Exception:
        return "local"


# --------------------------------------------------------------------------- progress
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


class _Reporter:
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


# --------------------------------------------------------------------------- the job
def run(job: RenderJob) -> dict:
    import ray

    from rayimg.run.cluster import connect
    from rayimg.models.loader import check_family, model_id_and_hash, resolve_model_dir
    from rayimg.registry import list_adapters

    t0 = time.perf_counter()
    wall0 = time.time()
    job = absolute_paths(job)
    storage = Storage(job.storage)
    _ext_format(job)
    model_dir = resolve_model_dir(job.model, storage)
    family = check_family(job.model, model_dir)
    model_id, model_hash = model_id_and_hash(job.model, model_dir)  # adapters are checked against these
    if not job.model.pretrained.startswith("s3://"):
        job = type(job)(**{**job.__dict__, "model": type(job.model)(**{**job.model.__dict__, "pretrained": str(model_dir)})})
    adapters = list_adapters(storage, job.registry)
    connect(job.cluster)
    connected = time.time() - wall0
    ds = read_catalog(job, storage)
    estimate, head = catalog_preview(job, storage)
    print(f"[render] catalog {job.catalog.source} -> {job.output.uri} ({len(adapters)} adapter(s) in {job.registry}; "
          f"Ray ready {connected:.1f}s after the job started)", flush=True)
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.time()
    progress = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Progress).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    ).remote(None, hashlib.sha256(job.output.uri.encode()).hexdigest()[:12])
    # One streaming execution: Ray Data starts the render actors when it starts, so they load the
    # model and warm up the catalog's shape while the rows are validated and sorted. The sort
    # waits for every row, so no actor gets a unit before the total is known. Stateless tasks
    # validate; the render actors reserve no CPU (GPUs or actor_resources place them), or waiting
    # for their first unit they could hold every CPU the validation and the sort need.
    ds = ds.map_batches(Validate(job, adapters, base=(family, model_id, model_hash), progress=progress),
                        batch_size=VALIDATE_BATCH, batch_format="numpy")
    ds = ds.sort("group")
    # work units: runs of consecutive sorted rows (so mostly one batch key each), one block per
    # unit, so every actor gets work; the unit count stays bounded on huge catalogs (sized from
    # the catalog's estimated row count: the exact one comes with the sort)
    unit = unit_rows(job, estimate)
    ds = ds.repartition(target_num_rows_per_block=unit)
    warm = warm_shape(job, head)

    def split_line(snap: dict) -> str:
        validated = f"validated {snap['validated_at'] - wall0:.1f}s after the job started, " if snap["validated_at"] else ""
        return (f"[render] {snap['total']} valid row(s) to render or skip ({snap['bad_rows']} bad), in {ds_units(snap['total'], unit)} "
                f"work unit(s) of <= {unit} rows for {job.concurrency} actor(s) ({validated}"
                f"first unit on an actor {(snap['split_at'] or time.time()) - wall0:.1f}s after the job started)")

    reporter = _Reporter(progress, job.progress_interval_s, started, split_line)
    # Ray Data restarts a dead actor and re-runs its unit (max_restarts/max_task_retries -1 by
    # default). One unit in flight per actor: a unit waits in the shared queue, not behind a busy actor.
    # batch_size = one unit: each block is one unit, and Ray Data refuses batch_size=None for GPU actors
    ds = ds.map_batches(_render_rows_for(job, progress, wall0, warm), batch_size=unit, batch_format="numpy",
                        compute=ActorPoolStrategy(size=job.concurrency, max_tasks_in_flight_per_actor=1),
                        num_cpus=0, num_gpus=job.num_gpus_per_actor or None, resources=dict(job.actor_resources) or None)
    rendered = skipped = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n_new = int(np.sum(batch["rendered"])) if len(batch["rendered"]) else 0
            rendered += n_new
            skipped += len(batch["rendered"]) - n_new
    finally:
        snap = reporter.close()
        ray.kill(progress)
    # every actor is done: what a writer killed mid-write left is stale (its image was rendered again)
    storage.remove_partial_writes(job.output.uri)
    summary = finalize(storage, job.output.uri)
    from rayimg.render.contact_sheet import write_contact_sheet

    summary["contact_sheet"] = write_contact_sheet(storage, job.output.uri)
    snap = snap or {}
    steady = steady_rate(snap) if snap else None
    first = snap.get("first")
    summary.update(rendered=rendered, skipped_existing=skipped, seconds=round(time.perf_counter() - t0, 2),
                   units=ds_units(snap.get("total", 0), unit), actors=snap.get("per_actor", {}),
                   first_image_s=round(first - wall0, 2) if first else None, steady_images_per_s=steady and round(steady, 4),
                   compile_cache=snap.get("compile_cache", {}),
                   warm_ups=[{**w, "at": round(w["at"] - wall0, 2)} for w in snap.get("warm_ups", [])])
    if summary["compile_cache"]:
        print("[render] compile cache: " + ", ".join(f"{n} {action}" for action, n in sorted(summary["compile_cache"].items()))
              + (" (warm start)" if summary["compile_cache"].get("loaded") else ""), flush=True)
    timing = (f"; first image after {summary['first_image_s']:.1f}s" if first else "") + (f", then {steady:.3f} images/s" if steady else "")
    print(f"[render] done: {summary['images']} image(s) ({rendered} rendered, {skipped} already there) in {summary['seconds']:.1f}s{timing}, "
          f"{summary['errors']} bad row(s) in {job.output.uri}/errors.jsonl; manifest {job.output.uri}/manifest.parquet", flush=True)
    return summary


def warm_shape(job: RenderJob, rows: list[dict]) -> tuple[int, int, float]:
    """``(width, height, guidance_scale)`` of the catalog's first rows (its defaults applied) that
    most of them share: the shape the render actors warm up before the first unit (the job's
    defaults when none of them is valid)."""
    from collections import Counter

    from rayimg.render.catalog import RowError, normalize_row

    shapes: Counter = Counter()
    guidance: dict[tuple, float] = {}
    for row in rows:
        try:
            s = normalize_row({"prompt": "-", **{k: v for k, v in row.items() if v is not None}}, job.defaults, job.limits)
        except (RowError, TypeError, ValueError):
            continue
        shape = (s["width"], s["height"], s["guidance_scale"] > 1)
        shapes[shape] += 1
        guidance.setdefault(shape, s["guidance_scale"])
    if not shapes:
        d = job.defaults
        return d.width, d.height, d.guidance_scale
    shape = shapes.most_common(1)[0][0]
    return shape[0], shape[1], guidance[shape]


def unit_rows(job: RenderJob, total: int) -> int:
    """Rows per work unit: ``unit_batches`` engine batches, more on a huge catalog so there are
    at most ``concurrency * 64`` units."""
    unit = job.unit_batches * job.engine.batch_size
    most_units = max(job.concurrency * 64, 1)
    return max(unit, -(-total // most_units))


def ds_units(total: int, unit: int) -> int:
    return -(-total // unit) if total else 0
