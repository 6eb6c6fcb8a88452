"""Render actors that outlive a job (``keep_warm_s``): the next job renders at once.

A render actor's start-up (process, imports, model load, compiled graphs, CUDA graphs) takes tens
of seconds even with a warm compile cache; a job that finds actors already holding its model
skips all of it. With ``keep_warm_s > 0`` on a running cluster, the job's render actors are
detached, named actors in the ``rayimg-render`` namespace::

    <digest>-<i>     digest: the model (source and content hash), engine settings, registry,
                     storage settings, placement (GPUs, custom resources) and rayimg's code

A job looks the names up in order: an idle actor of an earlier job is claimed and reused, a busy
one (another job's, which holds a lease on it) is passed over, and missing ones are created. The
driver then hands the sorted catalog's work units to its actors itself (one unit in flight per
actor), where the default path lets Ray Data's actor pool do it: Ray Data's actors end with the job.

Leases: a job claims an actor for ``LEASE_S`` seconds, renewed by each unit and by the driver while
it runs, released when it ends; a driver that dies leaves a lease that lapses. An actor with no
lease, idle for ``keep_warm_s`` seconds, ends itself and gives its GPU back. A job short of the
resources its render actors ask for (kept or Ray Data's) ends idle kept actors first
(:func:`make_room`). Two jobs that create the same missing actor at the same moment share it
(their units run one after the other).

Failures: an actor that dies mid-unit is replaced under its name (it starts as a new actor would)
and its unit goes to the next free actor; a unit is idempotent (keys already written are skipped),
so every image is still written once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import deque
from pathlib import Path

from rayimg.config import RenderJob, to_dict
from rayimg.run.render_rows import RenderRows, shape_key

__all__ = ["NAMESPACE", "LEASE_S", "Resident", "pool_digest", "code_digest", "ResidentPool", "make_room"]

NAMESPACE = "rayimg-render"
LEASE_S = 120.0  # a job's claim on an actor, renewed while the job runs
CLAIM_WAIT_S = 5.0  # an existing actor that does not answer a claim this fast is busy (or starting) for another job


def code_digest() -> str:
    """sha256 of rayimg's Python sources: an actor runs the code of the job that started it."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def pool_digest(job: RenderJob, model_hash: str) -> str:
    """What a kept actor holds and where it runs: a job may reuse an actor only if all of it matches."""
    what = {"model": to_dict(job.model), "model_hash": model_hash, "engine": to_dict(job.engine), "registry": job.registry,
            "storage": to_dict(job.storage), "num_gpus": job.num_gpus_per_actor, "resources": dict(sorted(job.actor_resources.items())),
            "code": code_digest()}
    return "rr-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_room(job: RenderJob, need: int, keep_prefix: str | None = None) -> int:
    """End idle kept actors while the cluster lacks the resources ``need`` new render actors of
    ``job`` ask for (GPUs, custom resources): an idle actor kept for a later job never makes a job
    that runs now wait. Actors named ``keep_prefix...`` (the job's own kind) go last. Returns how
    many ended."""
    import ray

    per = {"GPU": job.num_gpus_per_actor, **job.actor_resources}
    per = {k: v * need for k, v in per.items() if v > 0}
    if not per or need <= 0:
        return 0

    def short() -> bool:
        free = ray.available_resources()
        return any(free.get(k, 0.0) + 1e-9 < v for k, v in per.items())

    if not short():
        return 0
    names = sorted((a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE),
                   key=lambda n: (keep_prefix is not None and n.startswith(keep_prefix), n))
    ended = 0
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
            ref = handle.evict.remote()
            ready, _ = ray.wait([ref], timeout=CLAIM_WAIT_S)  # a busy actor answers late: it is in use
            if not (ready and ray.get(ready[0])):
                continue
        except (ValueError, ray.exceptions.RayActorError):
            continue
        ended += 1
        deadline = time.monotonic() + 10  # its resources come back once Ray sees it gone
        while short() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not short():
            break
    if ended:
        print(f"[render] ended {ended} idle kept render actor(s) to free the resources this job needs", flush=True)
    return ended


class Resident(RenderRows):
    """A render actor kept between jobs (wrapped as a detached Ray actor by :class:`ResidentPool`).
    Its methods run one at a time: a claim sent while it renders waits for the unit to end."""

    def __init__(self, job: RenderJob, keep_warm_s: float, progress=None, job_started: float | None = None,
                 warm: tuple[int, int, float] | None = None, job_id: str | None = None):
        super().__init__(job, progress, job_started, warm)
        self.keep_warm_s = keep_warm_s
        self.job_id = job_id  # the job whose units it renders now
        self.holder, self.lease_until = job_id, time.time() + LEASE_S
        self.busy = False
        self.last_used = time.time()
        self.jobs = 1 if job_id else 0
        threading.Thread(target=self._reap, name="rayimg-render-keep-warm", daemon=True).start()

    def claim(self, job_id: str, keep_warm_s: float, lease_s: float = LEASE_S) -> dict | None:
        """Lease this actor to ``job_id`` (renew it if that job holds it); None when another job
        holds a lease that has not lapsed. Returns what it holds: label, jobs served, shapes warm."""
        now = time.time()
        if self.holder not in (None, job_id) and now < self.lease_until:
            return None
        if self.job_id != job_id:
            self.jobs += 1
        self.holder, self.lease_until, self.keep_warm_s = job_id, now + lease_s, keep_warm_s
        return {"label": self.label, "jobs": self.jobs, "warm": sorted(self.warmed)}

    def evict(self) -> bool:
        """End now if no job holds a lease (a job that needs this actor's resources asks);
        False when one does."""
        import ray

        if self.holder is not None and time.time() < self.lease_until:
            return False
        print(f"[render actor {self.label}] ending: another job needs its resources", flush=True)
        me = ray.get_runtime_context().current_actor
        threading.Timer(0.2, lambda: ray.kill(me, no_restart=True)).start()  # after this reply
        return True

    def renew(self, job_id: str, lease_s: float = LEASE_S) -> None:
        """Extend ``job_id``'s lease if it still holds one (a renewal that arrives after the
        release does nothing)."""
        if self.holder == job_id:
            self.lease_until = max(self.lease_until, time.time() + lease_s)

    def release(self, job_id: str) -> None:
        if self.holder == job_id:
            self.holder, self.lease_until = None, 0.0
            self.last_used = time.time()

    def prepare(self, job: RenderJob, progress, job_id: str, job_started: float, warm: tuple[int, int, float] | None) -> None:
        """Bind the job's settings and progress, and warm ``warm``'s shape up if it is new here."""
        self._bind(job, progress, job_id)
        if warm is not None and shape_key(*warm) not in self.warmed:
            self.warm_up(warm, job_started)

    def render(self, batch: dict, job: RenderJob, progress, job_id: str, lease_s: float = LEASE_S) -> dict:
        """One work unit of ``job`` (see :meth:`RenderRows.__call__`)."""
        self.busy = True
        try:
            self._bind(job, progress, job_id)
            return self(batch)
        finally:
            self.busy = False
            self.last_used = time.time()
            if self.holder == job_id:
                self.lease_until = max(self.lease_until, self.last_used + lease_s)

    def _bind(self, job: RenderJob, progress, job_id: str) -> None:
        if job_id != self.job_id:  # a new job: its own output, defaults and progress counts
            self.job_id, self.job, self.progress = job_id, job, progress
            self._cache_events_sent = len(self.renderer.compile_cache_status)
            self._started_units = False

    def _reap(self) -> None:
        """End this actor once it has had no lease and no unit for ``keep_warm_s`` seconds."""
        import ray

        while True:
            time.sleep(max(0.2, min(5.0, self.keep_warm_s / 4)))
            now = time.time()
            if self.busy or (self.holder is not None and now < self.lease_until):
                continue
            if now - max(self.last_used, self.lease_until) >= self.keep_warm_s:
                print(f"[render actor {self.label}] idle for {self.keep_warm_s:g}s (keep_warm_s): ending, its resources go back", flush=True)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


class ResidentPool:
    """The job's kept render actors: claimed or created at the start, fed work units by
    :meth:`render`, released at the end (see the module's docstring)."""

    def __init__(self, job: RenderJob, model_hash: str, progress, job_started: float, warm: tuple[int, int, float] | None):
        import ray

        self.job, self.progress, self.job_started, self.warm = job, progress, job_started, warm
        self.job_id = ray.get_runtime_context().get_job_id() + f":{time.time_ns()}"
        self.digest = pool_digest(job, model_hash)
        self.actors: list = []  # handles, this job's
        self.names: dict = {}  # handle's actor id -> name
        self.starting: dict = {}  # actors not yet up: a ready ref -> actor
        self.reused_flags: list[bool] = []  # per actor of self.actors at the start: kept from an earlier job
        self.claim()
        self._done = threading.Event()
        threading.Thread(target=self._renew_loop, name="rayimg-render-lease", daemon=True).start()

    @property
    def reused(self) -> int:
        """How many of the job's actors were kept from an earlier job."""
        return sum(self.reused_flags)

    def _options(self, name: str) -> dict:
        return dict(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                    num_gpus=self.job.num_gpus_per_actor or None, resources=dict(self.job.actor_resources) or None,
                    max_restarts=0, max_task_retries=0)

    def _create(self, name: str):
        import ray

        cls = ray.remote(Resident).options(**self._options(name))
        handle = cls.remote(self.job, self.job.keep_warm_s, self.progress, self.job_started, self.warm, self.job_id)
        self.names[handle._actor_id.hex()] = name
        return handle

    def _add(self, handle, reused: bool) -> None:
        self.actors.append(handle)
        self.reused_flags.append(reused)

    def claim(self) -> None:
        import ray

        want = self.job.concurrency
        made_room = False
        for i in range(4 * want + 4):  # bounded: names held by other jobs are passed over
            if len(self.actors) == want:
                break
            name = f"{self.digest}-{i}"
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # no such actor (or it ended): a new one, claimed by its constructor
                if not made_room:
                    made_room = True
                    make_room(self.job, want - len(self.actors), keep_prefix=self.digest)
                self._add(self._create(name), reused=False)
                continue
            ref = handle.claim.remote(self.job_id, self.job.keep_warm_s)
            ready, _ = ray.wait([ref], timeout=CLAIM_WAIT_S)
            try:
                held = ray.get(ready[0]) if ready else None
            except ray.exceptions.RayActorError:  # it ended while we asked: create it anew
                self._add(self._create(name), reused=False)
                continue
            if not ready:
                try:
                    ray.cancel(ref)  # busy or starting for another job: the claim must not run later
                except Exception:
                    pass
            if held is None:
                continue
            self.names[handle._actor_id.hex()] = name
            self._add(handle, reused=True)
            handle.prepare.remote(self.job, self.progress, self.job_id, self.job_started, self.warm)
        if len(self.actors) < want:
            raise RuntimeError(f"found only {len(self.actors)} of {want} render actors: the others are held by running jobs")
        print(f"[render] render actors: {self.reused} kept warm from an earlier job, {len(self.actors) - self.reused} new; "
              f"they stay {self.job.keep_warm_s:g}s after the job (keep_warm_s; namespace {NAMESPACE!r})", flush=True)

    def _renew_loop(self) -> None:
        """Fire-and-forget lease renewals while the job runs (a busy actor takes them after its unit)."""
        while not self._done.wait(LEASE_S / 4):
            for handle in list(self.actors):
                try:
                    handle.renew.remote(self.job_id)
                except Exception:
                    pass

    def render(self, units) -> tuple[int, int]:
        """Hand ``units`` (an iterator of work-unit batches) to the actors, one unit in flight per
        actor; a unit whose actor died goes to the next free actor, and the dead actor is replaced
        (at most twice per actor of the job: an actor that cannot start fails the job with its
        error). Returns (rendered, skipped)."""
        import ray

        pending: dict = {}  # unit ref -> (actor, unit)
        # an actor takes units once it is up: one that cannot start (no room for it) holds none back
        free = deque(actor for actor, reused in zip(self.actors, self.reused_flags) if reused)
        starting = self.starting  # an actor not yet up: its ready ref -> actor
        for actor, reused in zip(self.actors, self.reused_flags):
            if not reused:
                starting[actor.__ray_ready__.remote()] = actor
        retry: deque = deque()
        units = iter(units)
        exhausted = False
        rendered = skipped = 0
        replacements = 2 * len(self.actors)
        if not free:  # none up yet: the catalog is validated and sorted into units while they start
            first = next(units, None)
            if first is None:
                exhausted = True
            else:
                retry.append(first)
        while True:
            while free and (retry or not exhausted):
                unit = retry.popleft() if retry else next(units, None)
                if unit is None:
                    exhausted = True
                    break
                actor = free.popleft()
                pending[actor.render.remote(unit, self.job, self.progress, self.job_id)] = (actor, unit)
            if not pending and exhausted and not retry:
                return rendered, skipped
            if not pending and not starting:
                raise RuntimeError("every render actor of the job died and none could be replaced")
            ref = ray.wait(list(pending) + list(starting), num_returns=1)[0][0]
            actor, unit = pending.pop(ref) if ref in pending else (starting.pop(ref), None)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                name = self.names.get(actor._actor_id.hex(), "?")
                if unit is not None:
                    retry.append(unit)
                if replacements <= 0:
                    raise RuntimeError(f"render actor {name} died and the job's replacements are used up: {e}") from e
                replacements -= 1
                print(f"[render] render actor {name} died ({type(e).__name__}); "
                      f"{'its unit goes to the next free actor and ' if unit is not None else ''}a replacement starts", flush=True)
                new = self._replace(actor)
                starting[new.__ray_ready__.remote()] = new
                continue
            if unit is not None:
                n_new = int(sum(bool(x) for x in out["rendered"]))
                rendered += n_new
                skipped += len(out["rendered"]) - n_new
            free.append(actor)

    def _replace(self, dead):
        name = self.names.pop(dead._actor_id.hex(), None) or f"{self.digest}-r{time.time_ns()}"
        self.actors = [a for a in self.actors if a is not dead]
        new = self._create(name)
        self.actors.append(new)
        return new

    def release(self) -> None:
        import ray

        self._done.set()
        for ref, actor in self.starting.items():  # an actor (first or replacement) that never came up, e.g. no room for it: not kept
            if not ray.wait([ref], timeout=0)[0]:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        refs = [handle.release.remote(self.job_id) for handle in self.actors]
        ray.wait(refs, num_returns=len(refs), timeout=10)
