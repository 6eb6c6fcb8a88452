"""Step-level (continuous) batching over an :class:`~rayimg.render.engine.Engine` (plain PyTorch).

A request joins the running batch at the next denoising step and leaves when its own steps
are done, so a short request never waits for a long batch, and the UNet always sees every
request in flight. Each sample keeps its own scheduler (its own timesteps, step index and
state: any scheduler, several in one batch), its own step count, guidance scale and seed;
only the UNet call is shared::

    batcher = StepBatcher(engine, max_batch=8)
    slot = batcher.submit(request)            # queued; joins at the next step
    while batcher.busy:
        for done in batcher.step():           # one denoising step of the running batch
            done.image                        # PIL image (or done.error)

Samples share a batch when their UNet inputs fit one tensor: same mode, width, height and
guidance on/off (:func:`compat_key`); other requests wait for the running group to drain,
oldest first. Each sample's math is the diffusers pipeline's for that request alone
(txt2img: prompt embeddings, seeded CPU noise times the scheduler's initial sigma, the
scheduler's ``scale_model_input``, CFG, ``scheduler.step``, the VAE decode), so an image from a
mixed batch equals the same request rendered alone up to kernel rounding.

``adapters``: per-sample LoRA, e.g. :class:`~rayimg.render.slot_adapters.SlotAdapters` over
:class:`~rayimg.render.multi_lora.AdapterSlots`: ``acquire(request)`` when a request starts (its
handle), ``release(handle)`` when it ends, ``select(handles, guidance, rows)`` before each UNet call
(one handle per sample, padding included; ``rows``: the UNet's batch, which the hook checks
against what it set) and ``encode(request, handle, encode)`` around its prompt
encoding. Without it, requests must name no adapters (or the engine's fused set).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch._dynamo

from rayimg.render.multi_lora import SlotsExhausted
from rayimg.render.output import to_pending, to_pil
from rayimg.render.request import GenerationRequest, canonical_adapters
from rayimg.render.schedulers import make_scheduler

__all__ = ["StepBatcher", "Slot", "compat_key", "padded_size"]


def padded_size(n: int, pad_to) -> int:
    """The batch a step of ``n`` samples is padded to: the smallest ``pad_to`` size that holds
    them (``n`` itself when none does or ``pad_to`` is empty)."""
    return next((b for b in sorted(pad_to) if b >= n), n)


def compat_key(request: GenerationRequest, uses_cfg: bool) -> tuple:
    """Requests with equal keys can share a UNet call: one latent shape, the same UNet rows per sample."""
    return (request.mode, request.width, request.height, uses_cfg)


@dataclass(eq=False)
class Slot:
    """One request in the batcher: queued, then running, then done (``image`` or ``error``)."""

    request: GenerationRequest
    cancelled: Callable[[], bool] | None = None  # checked at every step boundary
    on_done: Callable[["Slot"], Any] | None = None
    finished: float | None = None
    image: Any = None  # PIL image (or the final latents with output="latent")
    error: BaseException | None = None
    step: int = 0  # denoising steps done
    batched: int = 0  # samples in the UNet calls of its steps, summed (mean batch = batched / step)
    swap_s: float = 0.0  # seconds its steps waited for adapter swaps (fuse_alone)
    # running state
    scheduler: Any = None
    timesteps: Any = None
    latents: torch.Tensor | None = None
    embeds: dict = field(default_factory=dict)
    generator: list | None = None
    step_kwargs: dict = field(default_factory=dict)
    adapters: Any = None  # the adapters hook's handle while running
    adapter_weights: list | None = None  # (LoraWeights, scale) pairs given at submit
    # where its time went (see StepBatcher.timings): perf_counter stamps, and CUDA events on a GPU
    stamps: dict = field(default_factory=dict)
    events: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def total_steps(self) -> int:
        return len(self.timesteps) if self.timesteps is not None else self.request.steps


class StepBatcher:
    """Continuous batching of txt2img requests over one engine's pipeline (see the module doc).

    ``max_batch``: samples per UNet call (each is two UNet rows with CFG). ``pad_to``: batch
    sizes to pad the UNet call to (e.g. ``(1, 2, 4, 8)``), so a compiled UNet with CUDA graphs
    sees a few static shapes; padding rows repeat the last sample and are discarded.
    ``output``: ``"pil"`` (decoded images) or ``"latent"`` (each sample's final latents, undecoded).
    ``compile_cache``: a :class:`~rayimg.render.compile_cache.CompileCache`: the compiled graphs of
    each UNet call shape (padded batch, size, guidance, slot layout) and decode shape are loaded
    before their first call and saved after it, so a new replica starts warm; :meth:`warm_up`
    makes those graphs before the first request.
    ``shared_graph``: each UNet call's batch dimension is marked dynamic (torch honours the marks
    under the engine's ``dynamic=False``; every other dimension stays static), so one compiled
    graph serves every padded batch size. With CUDA graphs torch still records one graph per size.
    Adapter slots on convolutions run a grouped convolution whose group count is the batch, which
    inductor specialises: with those, each size compiles its own graph as without the option.
    ``fuse_alone`` (with ``adapters`` that support it, as :class:`~rayimg.render.slot_adapters.SlotAdapters` does): a step with a
    single sample that runs at batch 1 (``pad_to`` empty or holding 1) runs the base model's graph
    with that sample's adapters fused into the UNet weights (the engine's
    :meth:`~rayimg.render.engine.Engine.set_adapters`) and the slots passed through, instead of the
    per-sample slot products; the first step with more samples restores the base weights. Each
    change of the fused set is one swap (``stats["swaps"]``, ``stats["swap_s"]``). A sample whose
    adapters touch the text encoders keeps the slots (fusing would change later prompt encodes).
    Single-threaded: one thread calls :meth:`submit` and :meth:`step` (a server wraps it).
    """

    def __init__(self, engine, *, max_batch: int = 8, pad_to: tuple[int, ...] = (), adapters=None, output: str = "pil",
                 compile_cache=None, shared_graph: bool = False, fuse_alone: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self.engine = engine
        self.pipe = engine.pipe
        self.max_batch = max_batch
        self.pad_to = tuple(sorted(pad_to))
        if output not in ("pil", "latent"):
            raise ValueError(f"output: 'pil' or 'latent', got {output!r}")
        self.output = output
        self.adapters = adapters
        self.waiting: deque[Slot] = deque()
        self.running: list[Slot] = []
        self.sdxl = engine.family == "sdxl"
        self.stats = {"steps": 0, "unet_rows": 0, "samples": 0, "joined_running": 0, "swaps": 0, "swap_s": 0.0}
        self.compile_cache = compile_cache
        self._shapes: set[str] = set()
        self.shared_graph = shared_graph
        self.fuse_alone = fuse_alone and adapters is not None and hasattr(adapters, "fusable")
        self._fused_here: tuple = ()  # the adapter set this batcher fused (fuse_alone), while the engine holds it
        # samples whose decode is queued on the device, with its pixels' copy to the host: each is
        # finished by the next step, after that step's UNet call is queued behind the decode
        self.decoding: list[tuple[Slot, Any]] = []

    # ------------------------------------------------------------------ queue
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.decoding)

    def submit(self, request: GenerationRequest, *, cancelled=None, on_done=None, adapter_weights: list | None = None) -> Slot:
        """Queue ``request``; it joins at the next step that has room. ``adapter_weights``: its
        adapters' ``(LoraWeights, scale)`` pairs for the adapters hook (default: the hook looks
        them up)."""
        if request.mode != "txt2img":
            raise ValueError(f"mode: step-level batching renders txt2img; {request.mode!r} goes through Engine.generate")
        if request.adapters and self.adapters is None and request.adapters != self.engine.adapter_identity:
            raise ValueError(f"adapters: {list(request.adapters)} are not applied and this batcher has no per-sample adapters")
        slot = Slot(request, cancelled=cancelled, on_done=on_done, adapter_weights=adapter_weights)
        slot.stamps["submitted"] = time.perf_counter()
        self.waiting.append(slot)
        return slot

    def _key(self, slot: Slot) -> tuple:
        return compat_key(slot.request, self.engine.prompts.uses_cfg(slot.request))

    def _admit(self) -> tuple[list[Slot], list[Slot]]:
        """Waiting requests that fit the running group, oldest first, up to ``max_batch``; and
        those that ended here (cancelled while queued, or failing to start)."""
        admitted, ended = [], []

        def end(slot: Slot, error: BaseException) -> None:  # one bad request never stops the batch
            self.waiting.remove(slot)
            self._finish(slot, error=error)  # releases what it acquired
            ended.append(slot)

        key = self._key(self.running[0]) if self.running else None
        for slot in list(self.waiting):
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            if self._cancelled(slot):
                end(slot, TimeoutError("cancelled before it started"))
                continue
            own = self._key(slot)
            if key is None:
                key = own
            if own != key:
                continue
            try:
                if self.adapters is not None:
                    slot.adapters = self.adapters.acquire(slot.request, slot.adapter_weights)
                self._start(slot)
            except SlotsExhausted as e:
                if not (self.running or admitted):
                    end(slot, e)  # alone, and still no room: it can never fit
                continue  # else it waits (in order) until a running request frees its slots
            except Exception as e:  # noqa: BLE001
                end(slot, e)
                continue
            self.waiting.remove(slot)
            self._stamp(slot, "admitted")
            admitted.append(slot)
        if admitted and self.running:
            self.stats["joined_running"] += len(admitted)
        return admitted, ended

    # ------------------------------------------------------------------ one sample
    def _start(self, slot: Slot) -> None:
        """The pipeline's set-up for this request alone: scheduler, timesteps, prompt embeddings,
        seeded noise."""
        req, pipe = slot.request, self.pipe
        device = self.engine.device
        scheduler = make_scheduler(req.scheduler, self.engine.base_scheduler_config)
        scheduler.set_timesteps(req.steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        slot.scheduler, slot.timesteps = scheduler, scheduler.timesteps

        def encode(cached: bool = True):
            return self.engine.prompts.embeds([req], cached=cached)

        if self.adapters is not None:  # acquired by _admit
            embeds = self.adapters.encode(req, slot.adapters, encode)
        else:
            embeds = encode()
        dtype = embeds["prompt_embeds"].dtype
        slot.generator = [torch.Generator(device="cpu").manual_seed(req.seed)]
        vae_scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, req.height // vae_scale, req.width // vae_scale)
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(shape, generator=slot.generator, device=device, dtype=dtype)
        slot.latents = latents * scheduler.init_noise_sigma
        cfg = self.engine.prompts.uses_cfg(req)
        cond = {"embeds": embeds["prompt_embeds"].to(device)}
        uncond = {"embeds": embeds["negative_prompt_embeds"].to(device)} if cfg else None
        if self.sdxl:
            projection = int(embeds["pooled_prompt_embeds"].shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids((req.height, req.width), (0, 0), (req.height, req.width), dtype=dtype,
                                              text_encoder_projection_dim=projection).to(device)
            cond.update(text_embeds=embeds["pooled_prompt_embeds"].to(device), time_ids=time_ids)
            if cfg:
                uncond.update(text_embeds=embeds["negative_pooled_prompt_embeds"].to(device), time_ids=time_ids)
        slot.embeds = {"cond": cond, "uncond": uncond}
        params = inspect.signature(scheduler.step).parameters
        slot.step_kwargs = {"generator": slot.generator} if "generator" in params else {}
        if "eta" in params:
            slot.step_kwargs["eta"] = 0.0

    def _cancelled(self, slot: Slot) -> bool:
        try:
            return bool(slot.cancelled and slot.cancelled())
        except Exception:  # noqa: BLE001 - a broken check counts as cancelled
            return True

    def _stamp(self, slot: Slot, name: str) -> None:
        slot.stamps[name] = time.perf_counter()
        if self.engine.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            slot.events[name] = event

    @staticmethod
    def timings(slot: Slot) -> dict:
        """Seconds of a finished slot: ``queue_s`` (submitted to started: waiting, then its prompts
        encoded and noise drawn), ``denoise_s`` (its steps, from its start to its last step queued
        on the host), ``decode_s`` (to its pixels on the host); on a GPU also ``gpu_denoise_s`` and
        ``gpu_decode_s``, the same spans on the GPU's clock (a denoise far shorter on the GPU than
        end to end means the GPU waited for the host)."""
        st, out = slot.stamps, {}
        for name, a, b in (("queue_s", "submitted", "admitted"), ("denoise_s", "admitted", "denoised"), ("decode_s", "denoised", "decoded")):
            if a in st and b in st:
                out[name] = round(st[b] - st[a], 4)
        ev = slot.events
        try:
            if "decoded" in ev and ev["decoded"].query():  # complete: the spans before it are too
                out["gpu_denoise_s"] = round(ev["admitted"].elapsed_time(ev["denoised"]) / 1000, 4)
                out["gpu_decode_s"] = round(ev["denoised"].elapsed_time(ev["decoded"]) / 1000, 4)
        except (KeyError, RuntimeError):
            pass
        return out

    def _finish(self, slot: Slot, *, image=None, error: BaseException | None = None) -> None:
        slot.image, slot.error, slot.finished = image, error, time.perf_counter()
        slot.timings = self.timings(slot)
        slot.stamps, slot.events = {}, {}
        if slot.adapters is not None:
            handle, slot.adapters = slot.adapters, None
            self.adapters.release(handle)
        slot.latents = slot.scheduler = slot.timesteps = None
        slot.embeds = {}
        if slot.on_done is not None:
            slot.on_done(slot)

    # ------------------------------------------------------------------ one step of the batch
    @torch.no_grad()
    def step(self) -> list[Slot]:
        """Admit what fits, run one denoising step of every running sample, queue the decode of
        the samples whose steps are done; returns the slots that finished (or failed, or were
        cancelled).

        A decode is queued on the device with an asynchronous copy of its pixels to the host, and
        its sample is finished by the next step once that step's UNet call is queued: the host
        waits for the pixels (and makes the PIL image, and runs ``on_done``) while the device
        runs the next step, instead of the device idling while the host does. When nothing is
        left running, the decodes are finished at once."""
        finished: list[Slot] = []
        if self.adapters is not None and self.engine.adapter_identity and self.engine.adapter_identity != self._fused_here:
            # adapters fused into the weights by the engine's own path (img2img, sets the slots
            # cannot hold) would be added to every sample here and in the prompt encodes below:
            # the slots apply each sample's adapters to the base weights
            self._fuse((), (), self.running)
        for slot in list(self.running):
            if self._cancelled(slot):
                self.running.remove(slot)
                self._finish(slot, error=TimeoutError("cancelled"))
                finished.append(slot)
        admitted, ended = self._admit()
        self.running += admitted
        finished += ended
        if self.running:
            try:
                self._denoise(self.running, slots_off=self._set_weights(self.running))
            except Exception as e:  # noqa: BLE001 - the whole step failed: every sample in it fails
                return finished + self.fail(e, waiting=False)  # fail() finishes the decoding samples first
        finished += self._collect()  # the previous step's decodes, behind this step's UNet call
        done = [s for s in self.running if s.step >= s.total_steps]
        if done:
            self.running = [s for s in self.running if s.step < s.total_steps]
            for slot in done:
                self._stamp(slot, "denoised")
            images = self._decode(done, pending=True) if self.output == "pil" else None
            for slot in done:
                self._stamp(slot, "decoded")  # decoding: the GPU's clock here, the host's when its pixels arrive
            if images is not None:
                self.decoding = list(zip(done, images))
            else:
                for slot in done:
                    self._finish(slot, image=slot.latents[0])
                finished += done
        if not self.running:
            finished += self._collect()
        return finished

    def _collect(self) -> list[Slot]:
        """Finish the samples whose decode was queued: each gets its PIL image once its pixels are
        on the host, or the error that failed its decode."""
        decoding, self.decoding = self.decoding, []
        for slot, image in decoding:
            try:
                if not isinstance(image, BaseException):
                    image = image.result()
            except Exception as e:  # noqa: BLE001 - one bad decode fails its own sample only
                image = e
            slot.stamps["decoded"] = time.perf_counter()
            if isinstance(image, BaseException):
                self._finish(slot, error=image)
            else:
                self._finish(slot, image=image)
        return [slot for slot, _ in decoding]

    def fail(self, error: BaseException, *, waiting: bool = True) -> list[Slot]:
        """End every running request (and, with ``waiting``, every queued one) with ``error``;
        samples already decoding are finished with their own outcome."""
        decoded = self._collect()
        slots = self.running + (list(self.waiting) if waiting else [])
        self.running = []
        if waiting:
            self.waiting.clear()
        for slot in slots:
            self._finish(slot, error=error)
        return decoded + slots

    # ------------------------------------------------------------------ warm-up
    @torch.no_grad()
    def warm_up(self, width: int, height: int, *, guidance: bool = True, log: Callable[[str], None] | None = None) -> dict:
        """Run the UNet call of every batch size a step can be padded to (the ``pad_to`` sizes up
        to the one ``max_batch`` pads to; without ``pad_to``, 1 and ``max_batch``) and one sample's
        decode, at ``width`` x ``height``, guidance on or off (as the engine decides for a
        request with it), no adapters: the graphs live steps of that size use, made now (compiled,
        or loaded from the compile cache and saved to it, as a first real step would) instead of
        under a live request. Each size runs twice: with CUDA graphs (``reduce-overhead``) torch
        records a shape's graph at its second call. Dummy two-step requests go through
        :meth:`step`; the batcher must be idle and is left idle with its stats as they were.
        ``log``: called with one line per size (and the decode) as each is ready, so a long
        cold compile shows progress. Returns what was warmed and the seconds it took."""
        if self.busy:
            raise RuntimeError("warm_up: the batcher has requests; warm it up before the first submit")
        largest = padded_size(self.max_batch, self.pad_to)
        sizes = [b for b in self.pad_to if b <= largest] or sorted({1, self.max_batch})
        request = GenerationRequest(prompt="", steps=2, seed=0, width=width, height=height, guidance_scale=2.0 if guidance else 1.0)
        stats, output = dict(self.stats), self.output
        start = time.perf_counter()
        try:
            self.output = "latent"  # one decode below, not one per dummy sample
            for size in sizes:
                began = time.perf_counter()
                slots = [self.submit(request) for _ in range(min(size, self.max_batch))]  # padded up to size
                while self.busy:
                    self.step()
                error = next((s.error for s in slots if s.error is not None), None)
                if error is not None:
                    raise RuntimeError(f"warm_up: the step at batch {size} ({width}x{height}) failed: {error}") from error
                if log is not None:
                    log(f"warm-up: UNet step at batch {size} ({width}x{height}) ready in {time.perf_counter() - began:.1f}s")
            if output == "pil":
                began = time.perf_counter()
                [image] = self._decode([Slot(request, latents=slots[0].image[None])])
                if isinstance(image, BaseException):
                    raise RuntimeError(f"warm_up: the decode at {width}x{height} failed: {image}") from image
                if log is not None:
                    log(f"warm-up: decode at {width}x{height} ready in {time.perf_counter() - began:.1f}s")
            if self.engine.device.type == "cuda":
                torch.cuda.synchronize(self.engine.device)
        finally:
            if self.busy:  # a step raised: end what is left of the dummies
                self.fail(RuntimeError("warm_up: stopped"))
            self.output = output
            self.stats.clear()
            self.stats.update(stats)
        return {"width": width, "height": height, "guidance": self.engine.prompts.uses_cfg(request), "unet_batches": sizes,
                "decode": output == "pil", "seconds": time.perf_counter() - start}

    def _set_weights(self, slots: list[Slot]) -> bool:
        """fuse_alone: a lone sample at batch 1 gets its adapters fused and the slots passed
        through; any other step gets the base weights and the slots. Returns whether the slots
        are passed through."""
        if not self.fuse_alone:
            return False
        alone = None
        if len(slots) == 1 and padded_size(1, self.pad_to) == 1:
            alone = self.adapters.fusable(slots[0].adapters)
        if alone is not None:
            self._fuse(*alone, slots)
        elif self.engine.adapter_identity:
            self._fuse((), (), slots)
        self.adapters.passthrough(alone is not None)
        return alone is not None

    def _fuse(self, pairs, identity, waiting: list[Slot]) -> None:
        """Make ``identity`` (with its ``(weights, scale)`` ``pairs``) the engine's fused set;
        the swap's time is added to each of the ``waiting`` slots."""
        if canonical_adapters(identity) != self.engine.adapter_identity:
            began = time.perf_counter()
            self.engine.set_adapters(list(pairs), list(identity))
            seconds = time.perf_counter() - began
            self.stats["swaps"] += 1
            self.stats["swap_s"] += seconds
            for slot in waiting:
                slot.swap_s += seconds
        self._fused_here = self.engine.adapter_identity if pairs else ()

    def _rows(self, slots: list[Slot], part: str, name: str, pad: int) -> torch.Tensor:
        tensors = [s.embeds[part][name] for s in slots]
        return torch.cat(tensors + tensors[-1:] * pad)

    def _denoise(self, slots: list[Slot], slots_off: bool = False) -> None:
        n = len(slots)
        target = padded_size(n, self.pad_to)
        pad = target - n
        cfg = slots[0].embeds["uncond"] is not None
        scaled, timesteps = [], []
        for s in slots:
            t = s.timesteps[s.step]
            x = torch.cat([s.latents] * 2) if cfg else s.latents
            scaled.append(s.scheduler.scale_model_input(x, t))
            timesteps.append(t.reshape(1).to(torch.float32))
        scaled += scaled[-1:] * pad
        timesteps += timesteps[-1:] * pad
        t_rows = torch.cat(timesteps)
        parts = ["uncond", "cond"] if cfg else ["cond"]
        if cfg:
            sample = torch.cat([x[0:1] for x in scaled] + [x[1:2] for x in scaled])
            t_rows = torch.cat([t_rows, t_rows])
        else:
            sample = torch.cat(scaled)
        padded = slots + slots[-1:] * pad
        encoder = torch.cat([self._rows(slots, p, "embeds", pad) for p in parts])
        added = None
        if self.sdxl:
            added = {"text_embeds": torch.cat([self._rows(slots, p, "text_embeds", pad) for p in parts]),
                     "time_ids": torch.cat([self._rows(slots, p, "time_ids", pad) for p in parts])}
        if self.adapters is not None and not slots_off:
            self.adapters.select([s.adapters for s in padded], cfg, rows=sample.shape[0])
        t_rows = t_rows.to(sample.device)
        shape = {"mode": "step", "batch": target, "width": slots[0].request.width, "height": slots[0].request.height, "guidance": cfg}
        if slots_off:
            shape["slots"] = "passthrough"  # the base model's graph (fuse_alone), not the slotted one
        if self.shared_graph:
            if sample.shape[0] > 1:  # one compile-cache entry for every size (the sizes after the first compile nothing);
                shape["batch"] = "shared"  # a single UNet row (batch 1 without guidance) is always traced static
            for tensor in (sample, t_rows, encoder, *(added or {}).values()):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        with self._compiling(shape, self.engine.config.compile):
            out = self.pipe.unet(sample, t_rows, encoder_hidden_states=encoder, timestep_cond=None,
                                 cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False)[0]
        rows = target
        for b, s in enumerate(slots):
            if cfg:
                uncond, text = out[b:b + 1], out[rows + b:rows + b + 1]
                noise = uncond + s.request.guidance_scale * (text - uncond)
            else:
                noise = out[b:b + 1]
            s.latents = s.scheduler.step(noise, s.timesteps[s.step], s.latents, **s.step_kwargs, return_dict=False)[0]
            s.step += 1
            s.batched += n
        self.stats["steps"] += 1
        self.stats["unet_rows"] += sample.shape[0]
        self.stats["samples"] += n

    @contextlib.contextmanager
    def _compiling(self, shape: dict, compiled: bool):
        """The compile cache around the first call of each shape of a ``compiled`` module
        (nothing without a cache)."""
        if self.compile_cache is None or not compiled:
            yield
            return
        if self.adapters is not None and hasattr(self.adapters, "signature"):
            shape = {**shape, "adapter_slots": self.adapters.signature()}
        name = repr(sorted(shape.items()))
        first = name not in self._shapes
        if first:
            self._shapes.add(name)
            self.compile_cache.before_call(shape)
        yield
        if first:
            self.compile_cache.after_call(shape)

    def _decode(self, slots: list[Slot], pending: bool = False) -> list:
        """The pipelines' decode of each sample's final latents, one sample per call (one compiled
        decode graph, however many samples finish together): PIL images (``pending``:
        :class:`~rayimg.render.output.PendingImage`, whose pixels are on their way to the host),
        or in its place the exception that failed a sample's decode (the others still decode)."""
        images = []
        for slot in slots:
            req = slot.request
            try:
                with self._compiling({"mode": "step-decode", "batch": 1, "width": req.width, "height": req.height},
                                     self.engine.config.compile_vae):
                    images.append(self._decode_one(slot.latents, pending))
            except Exception as e:  # noqa: BLE001 - one bad decode fails its own sample only
                images.append(e)
        return images

    def _decode_one(self, latents: torch.Tensor, pending: bool = False):
        pipe, vae = self.pipe, self.pipe.vae
        if self.sdxl:
            needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
            if needs_upcasting:
                pipe.upcast_vae()
                latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
            if needs_upcasting:
                vae.to(dtype=torch.float16)
            if getattr(pipe, "watermark", None) is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type="pt")
        else:
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False, generator=None)[0]
            image = pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True])
        return (to_pending(image) if pending else to_pil(image))[0]
