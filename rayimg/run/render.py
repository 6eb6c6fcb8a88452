"""`rayimg render`: bulk rendering of a prompt catalog with Ray Data — resumable, exactly once.

    catalog (JSONL/CSV/Parquet, streamed) -> validate rows (tasks; bad rows to errors/)
      -> sort by (adapters, size, steps, scheduler) so actors swap adapters rarely
      -> render (Ray Data's actor pool, or with keep_warm_s on a running cluster actors kept
         between jobs, rayimg.run.resident; rayimg.run.render_rows): skip keys already written,
         write PNGs atomically, then the unit's manifest part -> manifest.parquet + errors.jsonl

An image's path is its output key (``images/<key>.png``): the same row always maps to the same
file, a re-run skips keys already there, and a PNG is either absent or complete (atomic write).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from rayimg.config import RenderJob, absolute_paths
from rayimg.run.catalog_source import FILE_COL, LINE_COL, TEXT_COL, _ext_format, parse_catalog_line, read_catalog
from rayimg.run.manifest import finalize, write_errors
from rayimg.run.render_rows import RenderRows
from rayimg.run.render_progress import Progress, Reporter, steady_rate
from rayimg.storage import Storage

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


# --------------------------------------------------------------------------- stage 2: render (rayimg.run.render_rows)
def _render_rows_for(job: RenderJob, progress, job_started: float | None = None, warm: tuple[int, int, float] | None = None):
    """RenderRows bound to this job: the arguments travel with the class, not as constructor
    arguments in the object store (which a restarted actor could find gone)."""

    class JobRenderRows(RenderRows):
        def __init__(self):
            super().__init__(job, progress, job_started, warm)

    JobRenderRows.__name__ = JobRenderRows.__qualname__ = "RenderRows"
    return JobRenderRows


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
    mode = connect(job.cluster)
    keep_warm = job.keep_warm_s > 0 and mode != "local"
    if job.keep_warm_s > 0 and not keep_warm:
        print(f"[render] note: keep_warm_s={job.keep_warm_s:g} has no effect on a local cluster, which ends with the job: "
              "start one (`ray start --head`) and set RAY_ADDRESS, or submit with `ray job submit`", flush=True)
    connected = time.time() - wall0
    ds, estimate, head = read_catalog(job, storage, preview=True)
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
    warm = warm_shape(job, head)
    ds = ds.map_batches(Validate(job, adapters, base=(family, model_id, model_hash), progress=progress),
                        batch_size=VALIDATE_BATCH, batch_format="numpy")
    ds = ds.sort("group")
    # work units: runs of consecutive sorted rows (so mostly one batch key each), one block per
    # unit, so every actor gets work; the unit count stays bounded on huge catalogs (sized from
    # the catalog's estimated row count: the exact one comes with the sort)
    unit = unit_rows(job, estimate)
    ds = ds.repartition(target_num_rows_per_block=unit)

    def split_line(snap: dict) -> str:
        validated = f"validated {snap['validated_at'] - wall0:.1f}s after the job started, " if snap["validated_at"] else ""
        return (f"[render] {snap['total']} valid row(s) to render or skip ({snap['bad_rows']} bad), in {ds_units(snap['total'], unit)} "
                f"work unit(s) of <= {unit} rows for {job.concurrency} actor(s) ({validated}"
                f"first unit on an actor {(snap['split_at'] or time.time()) - wall0:.1f}s after the job started)")

    pool = None
    if keep_warm:  # the job's actors are kept ones (rayimg.run.resident); the driver hands them the units
        from rayimg.run.resident import ResidentPool

        pool = ResidentPool(job, model_hash, progress, wall0, warm)
    elif mode != "local":  # actors kept idle by earlier jobs give way to this job's
        from rayimg.run.resident import make_room

        make_room(job, job.concurrency)
    reporter = Reporter(progress, job.progress_interval_s, started, split_line)
    rendered = skipped = 0
    try:
        if pool is not None:
            rendered, skipped = pool.render(ds.iter_batches(batch_size=None, batch_format="numpy"))
        else:
            # Ray Data restarts a dead actor and re-runs its unit (max_restarts/max_task_retries -1 by
            # default). One unit in flight per actor: a unit waits in the shared queue, not behind a busy actor.
            # batch_size = one unit: each block is one unit, and Ray Data refuses batch_size=None for GPU actors
            ds = ds.map_batches(_render_rows_for(job, progress, wall0, warm), batch_size=unit, batch_format="numpy",
                                compute=ActorPoolStrategy(size=job.concurrency, max_tasks_in_flight_per_actor=1),
                                num_cpus=0, num_gpus=job.num_gpus_per_actor or None, resources=dict(job.actor_resources) or None)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n_new = int(np.sum(batch["rendered"])) if len(batch["rendered"]) else 0
                rendered += n_new
                skipped += len(batch["rendered"]) - n_new
    finally:
        if pool is not None:
            pool.release()
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
                   compile_cache=snap.get("compile_cache", {}), warm_actors=pool.reused if pool is not None else 0,
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
