"""A generator replica's step loop: the :class:`~rayimg.render.stepper.StepBatcher` on a thread of
its own, fed from the replica's asyncio event loop.

Requests arrive from many concurrent ``generate`` calls; each sample is handed to the loop
thread, joins the running batch at the next denoising step and resolves its future when its own
steps are done (or it fails, or its ticket is done: client gone or deadline passed, checked at
every step). Work that needs the engine alone (img2img, requests the slots cannot hold) takes
the same lock as a step, so it runs between two steps.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from typing import Callable

from rayimg.render.stepper import Slot

logger = logging.getLogger("ray.serve")


class StepLoop:
    """Owns the engine's thread. ``batcher``: a StepBatcher. ``lock``: held during each step (the
    replica's other engine work takes it too). ``first``: called on the loop's thread before it
    takes requests (a warm-up: torch's CUDA graphs are recorded per thread, so graphs made on
    another thread would be recorded again by the first steps); the constructor waits for it,
    keeps its result in ``first_result`` and raises what it raised."""

    def __init__(self, batcher, lock: threading.Lock | None = None, idle_wait_s: float = 0.05, first: Callable[[], object] | None = None):
        self.batcher = batcher
        self.lock = lock or threading.Lock()
        self.idle_wait_s = idle_wait_s
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled = 0  # requests ended by their ticket (client gone or deadline passed)
        self.first_result, first_error, started = None, [], threading.Event()

        def run() -> None:
            try:
                if first is not None:
                    with self.lock:
                        self.first_result = first()
            except BaseException as e:  # noqa: BLE001 - handed to the constructor
                first_error.append(e)
                return
            finally:
                started.set()
            self._run()

        # the creator's context: torch's compiler settings (configure_compiler) are per-thread ContextVars
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="rayimg-step-loop", daemon=True)
        self.thread.start()
        started.wait()
        if first_error:
            raise first_error[0]

    @property
    def stats(self) -> dict:
        """The batcher's counts (steps, samples, ...) and the cancelled requests."""
        return {**self.batcher.stats, "cancelled": self.cancelled}

    # ------------------------------------------------------------------ from the event loop
    async def render(self, request, *, cancelled: Callable[[], bool] | None = None, adapters: list | None = None):
        """The request's finished :class:`~rayimg.render.stepper.Slot` (``image``: PIL) once its
        steps are done; raises what failed it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(slot) -> None:  # on the loop thread
            if isinstance(slot.error, TimeoutError):
                self.cancelled += 1  # counted here: its caller may be gone already

            def resolve():
                if future.done():
                    return
                if slot.error is not None:
                    future.set_exception(slot.error)
                else:
                    future.set_result(slot)

            loop.call_soon_threadsafe(resolve)

        self.inbox.put((request, cancelled, adapters, done))
        return await future

    # ------------------------------------------------------------------ the thread
    def _take(self, block: bool) -> None:
        """Move what the inbox holds into the batcher."""
        while True:
            try:
                request, cancelled, adapters, done = self.inbox.get(block=block, timeout=self.idle_wait_s if block else None)
            except queue.Empty:
                return
            block = False
            try:
                self.batcher.submit(request, cancelled=cancelled, on_done=done, adapter_weights=adapters)
            except Exception as e:  # noqa: BLE001 - refused: the caller gets the reason
                done(Slot(request, error=e, finished=time.perf_counter()))

    def _run(self) -> None:
        while True:
            self._take(block=not self.batcher.busy)
            if not self.batcher.busy:
                continue
            try:
                with self.lock:
                    self.batcher.step()
            except Exception as e:  # noqa: BLE001 - the loop must outlive any one step: fail what ran
                logger.exception("rayimg step loop: a step failed")
                self.batcher.fail(e)
