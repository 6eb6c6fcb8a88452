"""The generation engine shared by the bulk render job and the server (plain diffusers, no Ray).

Each image's noise comes from its own seeded CPU generator, and by default each request runs
through the pipeline on its own (see ``Engine(batch_invariant=...)``), so an image depends only
on its own parameters, never on the batch it lands in or the worker that renders it.

Modes: ``txt2img`` (the loaded StableDiffusion(XL)Pipeline), ``img2img`` and ``controlnet``
(the matching diffusers pipelines built on the loaded pipeline's modules: shared, nothing is
copied or cast). LoRA adapters are fused into the weights in place by
:class:`~rayimg.render.adapters.FusedAdapters` (no per-step cost; a compiled UNet does not
recompile when they change); textual-inversion embeddings load through diffusers.

Prompts are encoded by the engine, one text at a time, and kept in a small cache (a catalog's
rows usually share one negative prompt): an embedding depends only on its text and the text
encoders' weights, never on the batch. :meth:`Engine.prefetch` encodes the next batch's texts on a
side CUDA stream while the current batch denoises, so a stream of batches keeps the text
encoders off the accelerator's critical path.

Adapters are identified by ``(name, version, scale)``: requests carry the identity, the caller
supplies the weights with :meth:`Engine.set_adapters`, and :meth:`Engine.generate` refuses a
batch whose identity differs from what is fused, so an output key never names adapters that
were not applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import numbers
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image

from rayimg.render.adapters import FusedAdapters, LoraWeights
from rayimg.render.schedulers import SCHEDULER_TABLE, make_scheduler

__all__ = ["MODES", "GenerationRequest", "Engine", "canonical_adapters", "image_digest", "TEXTUAL_INVERSION_NAME"]

MODES = ("txt2img", "img2img", "controlnet")
TEXTUAL_INVERSION_NAME = "learned_embeds.safetensors"

AdapterId = tuple[str, str, float]


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (what a request's key records for it)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def canonical_adapters(adapters: Iterable[Any]) -> tuple[AdapterId, ...]:
    """``(name, version, scale)`` triples (tuples or ``{"name", "version", "scale"}`` dicts) as a
    sorted tuple of ``(str, str, float)``: the order adapters are listed in does not matter."""
    out = []
    for entry in adapters or ():
        if isinstance(entry, Mapping):
            try:
                name, version, scale = entry["name"], entry["version"], entry.get("scale", 1.0)
            except KeyError as e:
                raise ValueError(f"adapters: entry {dict(entry)!r} lacks {e.args[0]!r}") from None
        else:
            try:
                name, version, scale = entry
            except (TypeError, ValueError):
                raise ValueError(f"adapters: entry {entry!r} is not (name, version, scale)") from None
        out.append((str(name), str(version), float(scale)))
    out.sort(key=lambda a: (a[0], a[1]))
    seen = set()
    for name, version, _ in out:
        if (name, version) in seen:
            raise ValueError(f"adapters: {name!r} version {version!r} is listed twice")
        seen.add((name, version))
    return tuple(out)


def _number(name: str, value: Any, *, integer: bool = False, minimum: float | None = None) -> int | float:
    """``value`` as a plain int/float (numpy scalars from catalogs included), checked."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    value = int(value) if integer else float(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines one image (with the base model).

    ``adapters`` is the identity of the LoRA adapters (and textual inversions) in effect:
    ``(name, version, scale)`` triples, stored sorted. ``init_image`` (img2img) and
    ``control_image`` (controlnet) are PIL images of exactly ``width`` x ``height``; their
    sha256 stands for them in :meth:`params`. ``controlnet`` names the ControlNet model (the
    engine checks it matches its own).
    """

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = "euler"
    seed: int = 0
    mode: str = "txt2img"
    init_image: Image.Image | None = None
    strength: float = 0.8
    control_image: Image.Image | None = None
    controlnet_scale: float = 1.0
    controlnet: str = ""
    adapters: tuple[AdapterId, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", canonical_adapters(self.adapters))
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.scheduler not in SCHEDULER_TABLE:
            raise ValueError(f"scheduler: unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULER_TABLE)}")
        for name in ("prompt", "negative_prompt", "controlnet"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {type(getattr(self, name)).__name__}")
        for name, minimum in (("steps", 1), ("seed", 0), ("width", 8), ("height", 8)):
            object.__setattr__(self, name, _number(name, getattr(self, name), integer=True, minimum=minimum))
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name}: must be a multiple of 8, got {getattr(self, name)}")
        for name in ("guidance_scale", "strength", "controlnet_scale"):
            object.__setattr__(self, name, _number(name, getattr(self, name), minimum=0))
        digests = {}
        for name, mode in (("init_image", "img2img"), ("control_image", "controlnet")):
            image = getattr(self, name)
            if image is None:
                if self.mode == mode:
                    raise ValueError(f"{name}: is required for mode {self.mode!r}")
                continue
            if self.mode != mode:
                raise ValueError(f"{name}: is only used in mode {mode!r}, not {self.mode!r}")
            if not isinstance(image, Image.Image):
                raise ValueError(f"{name}: must be a PIL image, got {type(image).__name__}")
            if image.size != (self.width, self.height):
                raise ValueError(f"{name}: is {image.width}x{image.height} but the request asks for {self.width}x{self.height}")
            digests[name] = image_digest(image)
        if self.mode == "img2img" and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength: must be in (0, 1], got {self.strength}")
        object.__setattr__(self, "_digests", digests)

    def params(self) -> dict:
        """Every parameter that determines the image, JSON-able (images as their sha256).
        Fields a mode does not use are left out, so they cannot split keys."""
        params = {
            "mode": self.mode,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "scheduler": self.scheduler,
            "seed": self.seed,
            "adapters": [{"name": n, "version": v, "scale": s} for n, v, s in self.adapters],
        }
        if self.mode == "img2img":
            params.update(init_image=self._digests["init_image"], strength=self.strength)
        if self.mode == "controlnet":
            params.update(control_image=self._digests["control_image"], controlnet_scale=self.controlnet_scale,
                          controlnet=self.controlnet)
        return params

    def batch_key(self) -> tuple:
        """Requests with equal keys can be generated in one batch (one pipeline call)."""
        return (
            self.mode, self.adapters, self.steps, self.guidance_scale, self.width, self.height, self.scheduler,
            self.strength if self.mode == "img2img" else None,
            (self.controlnet, self.controlnet_scale) if self.mode == "controlnet" else None,
        )

    def __hash__(self) -> int:
        return hash(json.dumps(self.params(), sort_keys=True))


_PERSISTENT_ROWS = 4096  # widest row the engine's compiled kernels reduce in one pass (see _configure_compiler)
_ROWS_CHOICES = None


def _persistent_rows_choices():
    """inductor's heuristics, except that "inner" reductions (along contiguous rows) of up to
    :data:`_PERSISTENT_ROWS` elements keep the whole row in registers (persistent) instead of
    looping over it; inductor's own limit is 1,024, under SDXL's rows of 1,280."""
    global _ROWS_CHOICES
    if _ROWS_CHOICES is None:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V

        class PersistentRowsChoices(InductorChoices):
            @staticmethod
            def should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs) -> bool:
                if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
                    return True
                import torch._inductor.config as config

                return bool(config.triton.persistent_reductions and not cooperative_reduction
                            and features.get_reduction_hint() == ReductionHint.INNER
                            and V.graph.sizevars.statically_known_leq(features.reduction_numel, _PERSISTENT_ROWS))

            def uuid(self) -> str:
                return f"rayimg-persistent-rows-{_PERSISTENT_ROWS}"

        _ROWS_CHOICES = PersistentRowsChoices
    return _ROWS_CHOICES()


def _configure_compiler(persistent_rows: bool | None = None) -> None:
    """Process-wide torch.compile settings for the engine's graphs (the ones bench/ measures):
    room for one graph per batch/image size, 1x1 convolutions lowered to matmuls, and cooperative
    reductions (Triton): the channels-last GroupNorm statistics have few outputs (batch × 32
    groups) over many elements, which one thread block per output runs slowly (one such kernel
    took 3 ms per SDXL step at batch 4); split across blocks, the UNet step at UNet batch 8 went
    from 111.0 to 106.3 ms on an H100 (docs/BENCHMARKS.md, render run 6). The choice is static,
    so results stay deterministic (inductor's ``multi_kernel``, which picks by timing at run
    time, gained 0.9 ms more but could pick differently in another process).

    ``persistent_rows`` (default: on unless the environment sets ``RAYIMG_PERSISTENT_ROWS=0``):
    row reductions of up to 4,096 elements run persistent (:func:`_persistent_rows_choices`). SDXL's
    residual add + LayerNorm + float8 scaling kernels at width 1,280 went from 58 to 34 µs each
    (``bench/norm_fp8_bench.py``) and the UNet step at UNet batch 8 from 105.7 to 102.3 ms on an
    H100 (render run 7)."""
    import torch._dynamo
    import torch._inductor.config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    torch._inductor.config.conv_1x1_as_mm = True
    if hasattr(torch._inductor.config.triton, "cooperative_reductions") and "TORCHINDUCTOR_COOPERATIVE_REDUCTIONS" not in os.environ:
        torch._inductor.config.triton.cooperative_reductions = True  # unless the user chose
    if persistent_rows is None:
        persistent_rows = os.environ.get("RAYIMG_PERSISTENT_ROWS", "1") not in ("", "0")
    if hasattr(torch._inductor.config, "inductor_choices_class"):
        from torch._inductor.virtualized import V

        factory = _persistent_rows_choices if persistent_rows else None
        if torch._inductor.config.inductor_choices_class in (None, _persistent_rows_choices):
            torch._inductor.config.inductor_choices_class = factory
            # this thread may have built its handler already
            from torch._inductor.choices import InductorChoices

            V.set_choices_handler(factory() if factory else InductorChoices())
    elif persistent_rows:  # an older torch: this thread's handler only
        from torch._inductor.virtualized import V

        V.set_choices_handler(_persistent_rows_choices())


def inference_only(model) -> None:
    """Put a pipeline's models (or one model) in eval mode with no parameter requiring grad.

    diffusers and transformers load weights with ``requires_grad=True``, and under
    ``torch.compile`` that changes the inference graph even inside ``no_grad``: a 3-D input times
    a weight that requires grad stays a batched matmul over an expanded weight instead of being
    folded into one matmul, and inductor fused SDXL's upsample + concatenation + GroupNorm
    differently, into one reduction reading across channels (4.5 ms of a 33 ms step at UNet
    batch 2 on an H100, against 29 ms for the same UNet without grad; docs/BENCHMARKS.md, render
    run 8). Weights change later only under ``no_grad`` (adapter fusing copies in place)."""
    modules = [model] if isinstance(model, torch.nn.Module) else [m for m in model.components.values() if isinstance(m, torch.nn.Module)]
    for module in modules:
        module.eval()
        module.requires_grad_(False)


_PINNED_CLASSES: dict[type, type] = {}


def _pinned_execution_device(self):
    # offload hooks sit on the top-level modules (accelerate's _hf_hook, diffusers' group
    # offloading _diffusers_hook): with one there, ask diffusers as usual
    for model in self.components.values():
        if isinstance(model, torch.nn.Module) and (hasattr(model, "_hf_hook") or hasattr(model, "_diffusers_hook")):
            return super(type(self), self)._execution_device
    return next(self.unet.parameters()).device  # O(1), and follows a later .to()


def decode_in_chunks(vae, images: int) -> None:
    """Make ``vae.decode`` decode at most ``images`` latents at a time (an instance attribute over
    the class's method; the pipelines call ``vae.decode`` and see one batch). Each image's pixels
    depend only on its own latents, so chunks change no math; a compiled decoder keeps one graph for
    the chunk size, and its peak memory stays that of ``images`` images."""
    decode = type(vae).decode.__get__(vae)

    def chunked(z, *args, **kwargs):
        if z.shape[0] <= images:
            return decode(z, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", args[0] if args else True)
        args = args[1:]
        parts = [decode(part, False, *args, **kwargs)[0] for part in z.split(images)]
        sample = torch.cat(parts)
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    chunked.images = images  # type: ignore[attr-defined]
    vae.decode = chunked


def pin_execution_device(pipe) -> None:
    """Make ``pipe._execution_device`` the UNet's device, read from its first parameter.
    diffusers' property walks every submodule of every component looking for offload hooks at
    each pipeline call: about 3,000 modules for SDXL, 10-25 ms of host time per call in which the
    GPU waits (render run 5, docs/BENCHMARKS.md). The pipeline's class becomes a subclass (same
    name) that only overrides that property; a pipeline with offload hooks on a component still
    asks diffusers."""
    cls = type(pipe)
    if cls in _PINNED_CLASSES.values():
        return
    sub = _PINNED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"_execution_device": property(_pinned_execution_device),
                                          "__module__": cls.__module__, "__doc__": cls.__doc__})
        _PINNED_CLASSES[cls] = sub
    pipe.__class__ = sub


class Engine:
    """Wraps a loaded StableDiffusion(XL)Pipeline and generates images for requests. The
    pipeline's models become inference-only (eval mode, no parameter requiring grad; see
    :func:`inference_only`): do not train a pipeline an engine wraps.

    ``controlnet``: a ControlNetModel for mode ``controlnet`` (named ``controlnet_id`` in
    requests). ``compile``: ``torch.compile`` the UNet in place (adapter swaps keep the
    compiled graph; ``compile_mode`` ``"reduce-overhead"`` replays CUDA graphs, which read the
    weights in place too); ``compile_vae`` the VAE decoder. ``fp8``: the UNet's transformer linears
    that read a LayerNorm multiply in float8 (:mod:`rayimg.render.fp8`; H100/Ada or CPU; pixels
    differ from bf16, and :meth:`Renderer.key` records it). ``fp8_convs``: the UNet's ResNet and
    upsampler convolutions in float8 (:mod:`rayimg.render.fp8_conv`; CUDA: Hopper and the
    ``nvidia-cudnn-frontend`` package; CPU: a float32 reference; also in the key). ``fuse_qkv``: fuse the attention QKV projections (adapters still apply).
    ``originals_device``: where the base copies of adapted weights live (default: with the
    weights; ``"cpu"`` saves GPU memory at the cost of slower swaps).

    ``batch_invariant`` (default True): an image is bit-identical whatever batch it is rendered
    in, because :meth:`generate` runs the pipeline once per request. Kernels are not batch
    invariant in general (on CPU oneDNN convolutions and small-M GEMMs pick their algorithm by
    batch size: about 1e-6 apart in the UNet output), so a true batched call can differ in the
    last bits from the same image rendered alone. ``False`` makes one pipeline call per batch
    (faster on a GPU); images then stay deterministic for a given batch, not across batches.

    ``text_cache_size``: how many encoded texts (prompt or negative prompt) are kept; entries
    are dropped whenever the text encoders' weights change (adapters with text-encoder layers,
    textual inversions). ``prefetch_text`` (default: on CUDA) lets :meth:`prefetch` encode in a
    background thread on a side stream (on CPU, where it is off by default, the same bookkeeping
    encodes inline during the next call); off, :meth:`prefetch` does nothing. ``prefetch_mode``:
    ``"steps"`` (default) encodes on the calling thread, one text per denoising-step callback of the
    call in flight (the host time hides behind the steps queued ahead; on CUDA the kernels run on a
    side stream); ``"thread"`` in a worker thread (on CUDA a second Python thread that competes for
    the GIL with the thread launching the steps). Both give the bits of encoding in place.
    ``prefetch_priority``: the CUDA priority of the side stream (-1, the default, is high: the
    encoder's small kernels are scheduled ahead of the denoising steps' queued work instead of
    waiting behind it; 0 is the default stream priority).
    """

    text_cache_size = 64

    def __init__(
        self,
        pipe,
        *,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        vae_batch: int = 0,
        attention_slicing: bool = False,
        controlnet=None,
        controlnet_id: str = "",
        compile: bool = False,
        compile_vae: bool = False,
        compile_mode: str = "default",
        fuse_qkv: bool = False,
        fp8: bool = False,
        fp8_targets: str = "norm_fed",
        fp8_convs: bool = False,
        channels_last: bool = False,
        originals_device: torch.device | str | None = None,
        batch_invariant: bool = True,
    ):
        self.pipe = pipe
        self.batch_invariant = batch_invariant
        self.family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
        self.base_scheduler_config = pipe.scheduler.config
        inference_only(pipe)
        if vae_slicing:
            pipe.vae.enable_slicing()
        if vae_tiling:
            pipe.vae.enable_tiling()
        if vae_batch < 0:
            raise ValueError(f"engine.vae_batch must be >= 0 (0: the whole batch at once), not {vae_batch}")
        self.vae_batch = int(vae_batch)
        if vae_batch and not vae_slicing:
            decode_in_chunks(pipe.vae, vae_batch)
        self._decode_on = None  # the stream the current call decodes on (see overlap_decode)
        self._decode_stream = None
        self._wrap_decode(pipe.vae)
        if attention_slicing:
            pipe.enable_attention_slicing()
        if fuse_qkv:
            pipe.fuse_qkv_projections()
        if channels_last:
            # UNet only: the VAE runs eager, and eager CUDA GroupNorm returns contiguous outputs
            # (pytorch#111824), so a channels-last VAE converts layouts around every norm.
            pipe.unet.to(memory_format=torch.channels_last)
        self.fp8 = bool(fp8)
        self.fp8_targets = fp8_targets  # which linears (rayimg.render.fp8.TARGETS)
        if fp8:
            from rayimg.render.fp8 import TARGETS, convert_unet, fp8_unavailable

            if fp8_targets not in TARGETS:
                raise ValueError(f"engine.fp8_linears must be one of {sorted(TARGETS)}, not {fp8_targets!r}")

            why = fp8_unavailable(pipe.unet.device, pipe.unet.dtype)
            if why:
                raise ValueError(f"engine.fp8: {why}")
            convert_unet(pipe.unet, self.fp8_targets)  # after fuse_qkv: the fused projections are converted too
        self.fp8_convs = bool(fp8_convs)
        if fp8_convs:
            from rayimg.render.fp8_conv import convert_convs, fp8_conv_unavailable

            why = fp8_conv_unavailable(pipe.unet.device)
            if why is None and pipe.unet.device.type == "cuda" and pipe.unet.dtype != torch.bfloat16:
                why = f"on CUDA the model must be bfloat16 (model.dtype), not {str(pipe.unet.dtype).replace('torch.', '')}"
            if why:
                raise ValueError(f"engine.fp8_convs: {why}")
            convert_convs(pipe.unet)
        if compile or compile_vae:
            _configure_compiler()
        if compile:
            # In place (nn.Module.compile): the module keeps its identity and parameter paths,
            # so FusedAdapters and the img2img/controlnet pipelines share the compiled UNet.
            # One static graph per batch and image size (dynamic=False): a second size compiles
            # its own graph instead of a slower dynamic-shape one.
            pipe.unet.compile(mode=None if compile_mode == "default" else compile_mode, dynamic=False)
        if compile_vae:
            from rayimg.render.vae_decode import speed_up_decoder

            # the decoder alone (adapters never touch it): one graph per batch size and image size;
            # its GroupNorm statistics and attention as rayimg.render.vae_decode computes them
            # (16 SDXL images at 1024² on an H100: 0.420 vs 0.506 s per decode)
            speed_up_decoder(pipe.vae)
            pipe.vae.decoder.compile(dynamic=False)
        self.compiled = bool(compile)
        pipe.set_progress_bar_config(disable=True)
        if controlnet is not None:
            if controlnet.device != pipe.unet.device or controlnet.dtype != pipe.unet.dtype:
                controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
            inference_only(controlnet)
        self.controlnet = controlnet
        self.controlnet_id = controlnet_id
        self.fused = FusedAdapters(pipe, originals_device=originals_device)
        pin_execution_device(pipe)
        self._pipelines: dict[str, Any] = {"txt2img": pipe}
        self._embeddings: dict[str, tuple[str, AdapterId | None]] = {}  # token -> (sha256, identity)
        # encoded texts: (text-encoder state, text) -> (embeds, pooled or None, made on the side stream)
        self._text_state = 0
        self._text_cache: OrderedDict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None, bool]] = OrderedDict()
        self.prefetch_text = self.device.type == "cuda"
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._prefetch_future: Future | None = None
        # "steps" (default): background encodings run on this thread, one text per denoising-step
        # callback of the call in flight, on a side stream (CUDA): the accelerator works through the
        # steps queued ahead meanwhile. "thread": in a worker thread on the side stream; a second
        # Python thread competes for the GIL with the one launching the steps (render run 9).
        self.prefetch_mode = "steps"
        self._prefetch_steps: Iterator[None] | None = None
        self._prefetch_pending: tuple[int, list[str]] | None = None
        self._side_stream = None
        self.prefetch_priority = -1
        self._side_stream_priority = None
        self._weights_queued = None  # CUDA event: the current call's start, after every weight change
        self._warm_keys: set[tuple] = set()
        # texts encoded in place, encoded in the background, and found in the cache
        self.text_stats = {"encoded": 0, "prefetched": 0, "hits": 0}
        self.prefetch_wait_s = 0.0  # time spent waiting for background encodings to finish
        # txt2img/ControlNet calls start their scheduler at index 0 instead of looking the first
        # timestep up (same steps; the lookup syncs the host with the device)
        self.first_step_index = True
        self.busy_stats: dict[str, Any] = {"parts": 0, "seconds": 0.0, "lead_steps": []}  # while_busy work (see generate)
        # "pending" outputs on CUDA decode on a stream of their own (see _wrap_decode)
        self.overlap_decode = True

    def _wrap_decode(self, vae) -> None:
        """``vae.decode`` (whatever it is now: the class's method or :func:`decode_in_chunks`'s)
        behind a switch: while :attr:`_decode_on` holds a stream (a ``"pending"`` call on CUDA,
        :meth:`_call`), the decode and everything the pipeline does after it (postprocessing, the
        rounding and the copy to the host) run on that stream, which first waits for the latents.
        The next call's set-up then waits only for the denoising steps: its host-to-device copies
        (timesteps, initial noise, time ids) synchronize the main stream, so with one stream the
        host would wait for this decode too, then set up with the accelerator idle while the PNG
        threads it woke compete for the GIL (render run 11: a 0.19 s gap at each batch boundary).
        With its own stream the decode runs while the next call is set up and its first steps run."""
        inner = vae.decode

        def decode(z, *args, **kwargs):
            stream = self._decode_on
            if stream is not None and z.is_cuda:
                stream.wait_stream(torch.cuda.current_stream(z.device))
                z.record_stream(stream)  # made on the main stream, read here: kept until this stream is done with it
                torch.cuda.set_stream(stream)  # until _call puts the main stream back
            return inner(z, *args, **kwargs)

        decode.inner = inner  # type: ignore[attr-defined]
        vae.decode = decode

    def _decode_stream_for(self, pipe):
        """The stream a ``"pending"`` call decodes on (None: the current one): CUDA only, with
        :attr:`overlap_decode` on, and not when the pipeline converts the VAE's weights around the
        decode (float16 with ``force_upcast``): weights the next call could read meanwhile."""
        vae = getattr(pipe, "vae", None)
        if not self.overlap_decode or self.device.type != "cuda" or vae is None or getattr(vae.decode, "inner", None) is None:
            return None
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return None
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return self._decode_stream

    @classmethod
    def from_config(cls, pipe, cfg, **kwargs) -> "Engine":
        """An engine with the memory and compile options of an EngineConfig."""
        return cls(pipe, vae_slicing=cfg.vae_slicing, vae_tiling=cfg.vae_tiling, vae_batch=cfg.vae_batch, attention_slicing=cfg.attention_slicing,
                   compile=cfg.compile, compile_vae=cfg.compile_vae, compile_mode=cfg.compile_mode, fuse_qkv=cfg.fuse_qkv,
                   fp8=cfg.fp8, fp8_targets=cfg.fp8_linears, fp8_convs=cfg.fp8_convs, channels_last=cfg.channels_last, batch_invariant=cfg.batch_invariant, **kwargs)

    @property
    def device(self) -> torch.device:
        # the first parameter's device: diffusers' ModelMixin.device walks every submodule
        # looking for offload hooks (about 2,000 in the SDXL UNet), milliseconds per call
        return next(self.pipe.unet.parameters()).device

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_identity(self) -> tuple[AdapterId, ...]:
        """The ``(name, version, scale)`` of the LoRA adapters now fused, sorted."""
        return self.fused.identity

    def set_adapters(self, adapters: Sequence[tuple[LoraWeights, float]], identity: Sequence[Any] = ()) -> bool:
        """Fuse ``adapters`` (``(weights, scale)``) named by ``identity`` (``(name, version,
        scale)`` per adapter, same order); an empty list restores the base model. Returns False
        when that set is already fused."""
        adapters = list(adapters)
        if len(identity) != len(adapters):
            raise ValueError(f"set_adapters: {len(adapters)} adapter(s) but {len(identity)} identity entries")
        named = [(canonical_adapters([i])[0], pair) for i, pair in zip(identity, adapters)]
        for (name, version, scale), (_, weight_scale) in named:
            if float(weight_scale) != scale:
                raise ValueError(f"set_adapters: adapter {name!r} version {version!r} has scale {weight_scale} but its identity says {scale}")
        canonical = canonical_adapters(i for i, _ in named)  # sorted; rejects duplicates
        # A fixed order makes the fused sum (and so the image) independent of listing order.
        named.sort(key=lambda item: (item[0][0], item[0][1]))
        self._collect_prefetch()  # no encoding may read the text encoders while they change
        text_before = any(c.startswith("text_encoder") for c in self.fused.modified_components)
        if not adapters:
            changed = bool(self.fused.identity)
            self.fused.restore()
        else:
            changed = self.fused.apply([pair for _, pair in named], identity=canonical)
        if changed and (text_before or any(c.startswith("text_encoder") for c in self.fused.modified_components)):
            self._text_encoders_changed()
        if changed and (self.fp8 or self.fp8_convs):
            from rayimg.render.fp8 import requantize

            requantize(self.pipe.unet, self.fused.touched_parameters())
        return changed

    def load_textual_inversion(self, path: str | Path, token: str | None = None, identity: Any = None) -> str:
        """Load a textual-inversion embedding (safetensors only: the registry's
        ``learned_embeds.safetensors``, or a dir holding it) and return its token.

        SD files hold ``{token: (V, D)}``; SDXL files ``{"clip_l", "clip_g"}`` for the two
        text encoders. ``token`` defaults to the file's ``placeholder_token`` metadata (or its
        only key). Loading the same file again is a no-op; a different file for a loaded token
        replaces it. ``identity`` (``(name, version)`` or ``(name, version, scale)``) lets
        requests list the embedding among their adapters.
        """
        from safetensors.torch import load as load_safetensors

        from rayimg.render.adapters import _safetensors_metadata

        path = Path(path)
        if path.is_dir():
            path = path / TEXTUAL_INVERSION_NAME
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors textual inversion files are loaded (pickle formats are refused)")
        data = path.read_bytes()
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
        sha = hashlib.sha256(data).hexdigest()
        token = token or metadata.get("placeholder_token")
        if self.family == "sd":
            if token is None and len(tensors) == 1:
                token = next(iter(tensors))
            if token is None:
                raise ValueError(f"{path}: name the token (the file holds {sorted(tensors)} and no placeholder_token metadata)")
            embedding = tensors[token] if token in tensors else (next(iter(tensors.values())) if len(tensors) == 1 else None)
            if embedding is None:
                raise ValueError(f"{path}: no embedding for token {token!r} (keys {sorted(tensors)})")
            parts = [(embedding, self.pipe.text_encoder, self.pipe.tokenizer)]
        else:
            if set(tensors) != {"clip_l", "clip_g"}:
                raise ValueError(f"{path}: an SDXL textual inversion holds 'clip_l' and 'clip_g', got {sorted(tensors)}")
            if token is None:
                raise ValueError(f"{path}: name the token (no placeholder_token metadata)")
            parts = [(tensors["clip_l"], self.pipe.text_encoder, self.pipe.tokenizer),
                     (tensors["clip_g"], self.pipe.text_encoder_2, self.pipe.tokenizer_2)]
        ident = None
        if identity is not None:
            identity = tuple(identity)
            ident = canonical_adapters([identity if len(identity) == 3 else (*identity, 1.0)])[0]
        loaded = self._embeddings.get(token)
        if loaded is not None and loaded[0] == sha:
            self._embeddings[token] = (sha, ident or loaded[1])
            return token
        self._collect_prefetch()
        self._text_encoders_changed()
        if loaded is not None:
            for _, text_encoder, tokenizer in parts:
                self.pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=text_encoder)
        for embedding, text_encoder, tokenizer in parts:
            self.pipe.load_textual_inversion(embedding.to(text_encoder.dtype), token=token, text_encoder=text_encoder, tokenizer=tokenizer)
        self._embeddings[token] = (sha, ident)
        return token

    # ------------------------------------------------------------------ pipelines
    def pipeline(self, mode: str):
        """The diffusers pipeline of ``mode``, sharing this engine's modules."""
        if mode in self._pipelines:
            return self._pipelines[mode]
        import diffusers

        sdxl = self.family == "sdxl"
        if mode == "img2img":
            cls = diffusers.StableDiffusionXLImg2ImgPipeline if sdxl else diffusers.StableDiffusionImg2ImgPipeline
            pipe = self._derived(cls)
        elif mode == "controlnet":
            if self.controlnet is None:
                raise ValueError("mode 'controlnet': this engine has no ControlNet model (pass Engine(..., controlnet=model))")
            cls = diffusers.StableDiffusionXLControlNetPipeline if sdxl else diffusers.StableDiffusionControlNetPipeline
            pipe = self._derived(cls, controlnet=self.controlnet)
        else:
            raise ValueError(f"mode: unknown mode {mode!r}; one of {', '.join(MODES)}")
        pipe.set_progress_bar_config(disable=True)
        pin_execution_device(pipe)
        self._pipelines[mode] = pipe
        return pipe

    def _derived(self, cls, **extra):
        """``cls`` built on this engine's modules (shared, not copied). Not ``from_pipe``: that
        casts every shared module to one dtype, which would change the loaded pipeline."""
        params = inspect.signature(cls.__init__).parameters
        kwargs = {name: module for name, module in self.pipe.components.items() if name in params}
        config = self.pipe.config
        if "force_zeros_for_empty_prompt" in params and "force_zeros_for_empty_prompt" in config:
            kwargs["force_zeros_for_empty_prompt"] = config["force_zeros_for_empty_prompt"]
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = bool(config.get("requires_safety_checker", False)) and kwargs.get("safety_checker") is not None
        if "add_watermarker" in params:
            kwargs["add_watermarker"] = getattr(self.pipe, "watermark", None) is not None
        kwargs.update(extra)
        return cls(**kwargs)

    def _check_adapters(self, requested: tuple[AdapterId, ...]) -> None:
        embeddings = {ident for _, ident in self._embeddings.values() if ident is not None}
        loras = tuple(a for a in requested if a not in embeddings)
        if loras != self.fused.identity:
            raise ValueError(f"adapters: the batch asks for {list(loras)} but the engine has {list(self.fused.identity)} fused; call set_adapters first")

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[GenerationRequest], *, output_type: str = "pil",
                 while_busy: Callable[[], Any] | Iterator[Any] | None = None):
        """One image per request, in order (PIL by default; ``"np"`` gives float arrays,
        ``"latent"`` the final latents, ``"pending"`` :class:`PendingImage` objects: the call returns
        without waiting for the accelerator, and each ``result()`` gives the ``"pil"`` image). All requests must share ``batch_key()`` and the
        fused adapters.

        ``while_busy``: host work (e.g. loading the next batch's adapters) run on this thread
        while the accelerator works through queued steps (CUDA graphs: no sync per step), so it
        overlaps them instead of adding to the call. A callable runs once, when the last
        denoising step is queued; an iterator (a generator yielding between parts of its work)
        advances one part per step callback, so that each part fits in the few steps the CUDA
        launch queue lets the host run ahead. Whatever is left runs after the call. On a CPU
        the parts simply run between steps. What it does must not change this call's weights.
        :attr:`busy_stats` counts the parts, their host seconds and, on CUDA, the steps queued
        but not yet run when each part started (``lead_steps``)."""
        if not requests:
            return []
        keys = {r.batch_key() for r in requests}
        if len(keys) != 1:
            raise ValueError(f"requests in one batch must share mode, adapters, steps, guidance, size and scheduler; got {sorted(keys, key=repr)}")
        first = requests[0]
        self._check_adapters(first.adapters)
        if first.mode == "controlnet" and first.controlnet != self.controlnet_id:
            raise ValueError(f"controlnet: the request names {first.controlnet!r} but the engine holds {self.controlnet_id!r}")
        pipe = self.pipeline(first.mode)
        if self.batch_invariant:
            return [image for i, r in enumerate(requests)
                    for image in self._call(pipe, [r], output_type, while_busy if i == len(requests) - 1 else None)]
        return self._call(pipe, requests, output_type, while_busy)

    def _call(self, pipe, requests: list[GenerationRequest], output_type: str,
              while_busy: Callable[[], Any] | Iterator[Any] | None = None) -> list:
        first = requests[0]
        # A fresh scheduler per call: schedulers carry per-run state (step index, model outputs).
        pipe.scheduler = make_scheduler(first.scheduler, self.base_scheduler_config)
        if self.first_step_index and first.mode != "img2img" and hasattr(pipe.scheduler, "set_begin_index"):
            # a full schedule starts at index 0: the scheduler then skips its lookup of the first
            # timestep in the schedule, a device-to-host sync that would make the host wait for
            # the previous call's decode before queuing this call's first step (img2img sets its own)
            pipe.scheduler.set_begin_index(0)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        kwargs: dict[str, Any] = dict(
            **self._prompt_embeds(requests),
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type=output_type,
        )
        key = first.batch_key() + (len(requests),)
        warm = key in self._warm_keys
        self._weights_queued = None
        busy = [while_busy] if while_busy is not None else []  # until done: in step callbacks, else after the call
        queued: list = []  # CUDA events, one per step callback: how far the host is ahead of the GPU
        if self._prefetch_pending is not None and warm or while_busy is not None:

            def on_step_end(pipe_, i, t, outputs):
                if i == 0 and warm:
                    # the next batch's prompts are encoded once this call's first step is queued:
                    # the CPU then runs ahead of the accelerator (and the compiled graphs exist)
                    self._start_prefetch()
                self._advance_prefetch_steps()  # "steps" mode: one text per step
                if busy:
                    if self.device.type == "cuda":
                        queued.append(torch.cuda.Event())
                        queued[-1].record(torch.cuda.current_stream(self.device))
                    if not callable(busy[0]) or i >= getattr(pipe_, "num_timesteps", 0) - 1:
                        self._advance_while_busy(busy, warm, queued)
                return outputs

            kwargs["callback_on_step_end"] = on_step_end
            if self.device.type == "cuda":
                # every weight change is queued by now: a background encoding waits for this
                # point of the stream, not for the steps queued before it starts
                self._weights_queued = torch.cuda.Event()
                self._weights_queued.record(torch.cuda.current_stream(self.device))
        if first.mode == "img2img":
            kwargs.update(image=[r.init_image.convert("RGB") for r in requests], strength=first.strength)
        else:
            kwargs.update(width=first.width, height=first.height)
        if first.mode == "controlnet":
            kwargs.update(image=[r.control_image.convert("RGB") for r in requests], controlnet_conditioning_scale=first.controlnet_scale)
        if output_type == "pending":
            # pixels on their way to pinned host memory: nothing here waits for the accelerator,
            # so the caller can set up (and queue) its next call while this one decodes
            kwargs["output_type"] = "pt"
            main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            self._decode_on = self._decode_stream_for(pipe)
            try:
                images = _to_pending(pipe(**kwargs).images)  # on the decode stream (if any) from the decode on
            finally:
                self._decode_on = None
                if main is not None:
                    torch.cuda.set_stream(main)
        elif output_type != "pil":
            images = list(pipe(**kwargs).images)
        else:
            # PIL through device-side rounding: the same math as diffusers' "pil" output
            # ((x * 255).round() in float32 after its denormalisation), but the float image never
            # crosses to the CPU: only uint8 pixels do (a quarter of the bytes, no numpy passes).
            kwargs["output_type"] = "pt"
            images = _to_pil(pipe(**kwargs).images)
        self._warm_keys.add(key)
        self._weights_queued = None  # set_adapters may change weights before the next call
        while busy:  # what the step callbacks did not finish
            self._advance_while_busy(busy, True, [])
        if self._prefetch_pending is not None and "callback_on_step_end" in kwargs:
            self._start_prefetch()  # the call ended before its first step callback (no steps run)
        return images

    def _advance_while_busy(self, busy: list, start_prefetch: bool, queued: list) -> None:
        """Run the ``while_busy`` work (a callable: all of it; an iterator: its next part) and
        count it in :attr:`busy_stats`; once it is done an encoding it queued (:meth:`prefetch`)
        starts at once, not a call later."""
        work = busy[0]
        stats = self.busy_stats
        if queued:  # steps queued but not yet run by the GPU: the lead this part can hide in
            if len(stats["lead_steps"]) < 4096:
                stats["lead_steps"].append(sum(1 for event in queued if not event.query()))
        start = time.perf_counter()
        try:
            if callable(work):
                busy.clear()
                work()
            else:
                try:
                    next(work)
                except StopIteration:  # its last part ran in this call
                    busy.clear()
        except BaseException:
            busy.clear()
            close = getattr(work, "close", None)
            if close is not None:
                close()
            raise
        finally:
            stats["parts"] += 1
            stats["seconds"] += time.perf_counter() - start
        if not busy and start_prefetch and self._prefetch_pending is not None:
            self._start_prefetch()

    # ------------------------------------------------------------------ prompts
    def _uses_cfg(self, request: GenerationRequest) -> bool:
        """Whether the pipelines run classifier-free guidance (and so need the negative prompt)."""
        return request.guidance_scale > 1 and getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None

    def _texts(self, requests: list[GenerationRequest]) -> list[str]:
        texts = [r.prompt for r in requests]
        if self._uses_cfg(requests[0]):
            texts += [r.negative_prompt for r in requests]
        return texts

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One text through the text encoder(s), alone (batch 1), exactly as the pipelines encode
        a prompt: ``(embeds (1, T, D), pooled (1, P) for SDXL else None)``. Textual-inversion
        tokens are expanded by diffusers' ``maybe_convert_prompt``."""
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompt=[text], device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        return (out[0], out[2]) if self.family == "sdxl" else (out[0], None)

    def _text_encoders_changed(self) -> None:
        """The text encoders' weights change: encoded texts no longer hold."""
        self._text_state += 1
        self._text_cache.clear()
        self._prefetch_pending = None

    def _state(self):
        """What the cache is valid for: the engine's count of text-encoder changes, plus what
        can change outside the engine: the tokenizers' vocabularies (a textual inversion loaded
        through diffusers). ``None`` when the text encoders carry peft adapter layers (loaded
        with diffusers' ``load_lora_weights``): their scales change without the engine knowing,
        so nothing is cached then."""
        encoders = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        if any(e is not None and getattr(e, "peft_config", None) for e in encoders):
            return None
        tokenizers = [getattr(self.pipe, n, None) for n in ("tokenizer", "tokenizer_2")]
        return (self._text_state, *(len(t) if t is not None else 0 for t in tokenizers))

    def _prompt_embeds(self, requests: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (and the negative and pooled ones) for a pipeline call, each text
        encoded alone and cached."""
        self._collect_prefetch()
        state = self._state()
        cache = self._text_cache if state is not None else OrderedDict()
        for text in dict.fromkeys(self._texts(requests)):
            if (state, text) in cache:
                self.text_stats["hits"] += 1
            else:
                cache[(state, text)] = (*self._encode_text(text), False)
                self.text_stats["encoded"] += 1
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def stacked(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            entries = []
            for text in texts:
                entry = cache[(state, text)]
                cache.move_to_end((state, text))
                if entry[2] and stream is not None:
                    # made on the side stream: its memory must outlive this stream's use of it
                    for tensor in entry[:2]:
                        if tensor is not None:
                            tensor.record_stream(stream)
                entries.append(entry)
            pooled = None if entries[0][1] is None else torch.cat([e[1] for e in entries])
            return torch.cat([e[0] for e in entries]), pooled

        embeds, pooled = stacked([r.prompt for r in requests])
        kwargs: dict[str, torch.Tensor] = {"prompt_embeds": embeds}
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled
        if self._uses_cfg(requests[0]):
            negative, negative_pooled = stacked([r.negative_prompt for r in requests])
            kwargs["negative_prompt_embeds"] = negative
            if negative_pooled is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative_pooled
        while len(cache) > max(self.text_cache_size, 0):
            cache.popitem(last=False)
        return kwargs

    def prefetch(self, requests: list[GenerationRequest], adapters: Sequence[tuple[LoraWeights, float]] | None = None) -> bool:
        """Encode the texts of ``requests`` (the batch that comes next) in the background, during
        the next :meth:`generate` call (or at once, when called from its ``while_busy`` work), so
        the call after it finds them cached. Returns whether anything was queued: nothing is when
        ``prefetch_text`` is off, when every text is cached, or when the requests' adapters are
        not the ones fused and the swap to them may change the text encoders. ``adapters``: the
        ``(weights, scale)`` the requests will be rendered with; when neither they nor the fused
        set have text-encoder layers, the swap leaves the encoders alone and the texts are queued.
        Results never differ from encoding in place (an encoding made stale by a later change of
        the encoders is dropped)."""
        if not self.prefetch_text or not requests:
            return False
        try:
            self._check_adapters(requests[0].adapters)
        except ValueError:
            if adapters is None or self._swap_touches_text_encoders(adapters):
                return False
        self._collect_prefetch()
        state = self._state()
        if state is None:
            return False
        texts = [t for t in dict.fromkeys(self._texts(requests)) if (state, t) not in self._text_cache]
        self._prefetch_pending = (state, texts) if texts else None
        return bool(texts)

    def _swap_touches_text_encoders(self, adapters: Sequence[tuple[LoraWeights, float]]) -> bool:
        """Whether fusing ``adapters`` in place of the fused set may change the text encoders."""
        if any(c.startswith("text_encoder") for c in self.fused.modified_components):
            return True
        return any(c.startswith("text_encoder") and modules for weights, _ in adapters for c, modules in weights.layers.items())

    def _start_prefetch(self, *args) -> dict:
        """Start the pending encodings (also a pipeline step callback: returns the callback's
        tensor dict unchanged): in the worker thread, or (``prefetch_mode == "steps"``) as a
        generator the step callbacks advance. On CUDA both run on the side stream, after every
        weight change queued so far, so their kernels overlap the denoising steps."""
        pending, self._prefetch_pending = self._prefetch_pending, None
        if pending is not None and self._prefetch_future is None:
            if self.device.type != "cuda" and self.prefetch_mode != "steps":
                # CPU: encoded here, in the step callback. A second thread would only compete for
                # the same cores, and CPU kernels running concurrently split their work
                # differently, which changes the last bits.
                future: Future = Future()
                future.set_result(self._encode_texts(*pending, None))
                self._prefetch_future = future
                return args[3] if len(args) == 4 else {}
            side = self._prefetch_stream()
            if self.prefetch_mode == "steps":
                future = Future()
                self._prefetch_future = future
                self._prefetch_steps = self._encode_steps(*pending, future, side)
                return args[3] if len(args) == 4 else {}
            if self._prefetch_pool is None:
                self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayimg-text")
            # the GPU: the side stream's kernels are the same kernels, so the bits are the same
            self._prefetch_future = self._prefetch_pool.submit(self._encode_texts, *pending, side)
        return args[3] if len(args) == 4 else {}

    def _prefetch_stream(self):
        """The side stream for background encodings (CUDA; None elsewhere), made to wait for every
        weight change queued so far (this call's start when a call is running)."""
        if self.device.type != "cuda":
            return None
        if self._side_stream is None or self._side_stream_priority != self.prefetch_priority:
            self._side_stream = torch.cuda.Stream(self.device, priority=self.prefetch_priority)
            self._side_stream_priority = self.prefetch_priority
        side = self._side_stream
        if self._weights_queued is not None:
            side.wait_event(self._weights_queued)
        else:
            side.wait_stream(torch.cuda.current_stream(self.device))  # after every weight change queued so far
        return side

    def _encode_texts(self, state: int, texts: list[str], side) -> tuple[int, dict]:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            out = {text: self._encode_text(text) for text in texts}
        if side is not None:
            side.synchronize()  # complete before the main stream reads them
        self.text_stats["prefetched"] += len(out)
        return state, out, side is not None

    def _encode_steps(self, state: int, texts: list[str], future: Future, side=None) -> Iterator[None]:
        """``prefetch_mode == "steps"``: one text per ``next()``, on this thread (no second Python
        thread competing for the GIL with the one that launches the steps) and on ``side`` (CUDA;
        else the current stream); the future gets the encodings with the last one, and an event
        the main stream waits for before it reads them."""
        out = {}
        for i, text in enumerate(texts):
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                out[text] = self._encode_text(text)
            if i == len(texts) - 1:
                self.text_stats["prefetched"] += len(out)
                done = None
                if side is not None:
                    done = torch.cuda.Event()
                    done.record(side)
                future.set_result((state, out, done if side is not None else False))
            yield

    def _advance_prefetch_steps(self, everything: bool = False) -> None:
        """The next text of a step-wise background encoding (``everything``: all that is left)."""
        while self._prefetch_steps is not None:
            try:
                next(self._prefetch_steps)
            except StopIteration:
                self._prefetch_steps = None
                return
            except BaseException as exc:
                steps, self._prefetch_steps = self._prefetch_steps, None
                steps.close()
                if self._prefetch_future is not None and not self._prefetch_future.done():
                    self._prefetch_future.set_exception(exc)
                raise
            if not everything:
                return

    def _collect_prefetch(self) -> None:
        """Wait for a background encoding and put what it made into the cache."""
        start = time.perf_counter()
        self._advance_prefetch_steps(everything=True)  # "steps": what the step callbacks did not reach
        future, self._prefetch_future = self._prefetch_future, None
        if future is None:
            return
        state, out, side = future.result()
        if isinstance(side, torch.cuda.Event):  # encoded on the side stream from this thread: ordered, not waited for
            torch.cuda.current_stream(self.device).wait_event(side)
            side = True
        self.prefetch_wait_s += time.perf_counter() - start
        if state != self._state():
            return
        for text, (embeds, pooled) in out.items():
            self._text_cache.setdefault((state, text), (embeds, pooled, side))


class _PendingPixels:
    """A batch's uint8 pixels ``(B, H, W, 3)`` being copied into pinned host memory, and the CUDA
    event that marks the end of the copy (None: already on the host)."""

    def __init__(self, host: torch.Tensor, event: "torch.cuda.Event | None"):
        self.host, self.event = host, event
        self.ready = time.perf_counter() if event is None else None
        self._lock = threading.Lock()

    def array(self):
        with self._lock:
            if self.ready is None:
                self.event.synchronize()
                self.ready = time.perf_counter()
        return self.host.numpy()


class PendingImage:
    """An image of :meth:`Engine.generate` ``output_type="pending"``: :meth:`result` waits for its
    pixels (the first wait of a batch waits for the copy of the whole batch) and gives the PIL image
    that ``"pil"`` gives; :attr:`ready_at` is when the batch's pixels reached the host
    (``time.perf_counter()``)."""

    __slots__ = ("_batch", "_index")

    def __init__(self, batch: _PendingPixels, index: int):
        self._batch, self._index = batch, index

    def result(self) -> Image.Image:
        return Image.fromarray(self._batch.array()[self._index])

    @property
    def ready_at(self) -> float:
        self._batch.array()
        return self._batch.ready


def _to_pending(images: torch.Tensor) -> list[PendingImage]:
    """:func:`_to_pil`'s rounding on the device, then an asynchronous copy into pinned memory."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if pixels.device.type == "cuda":
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(pixels.device))
        batch = _PendingPixels(host, event)
    else:
        batch = _PendingPixels(pixels.cpu(), None)
    return [PendingImage(batch, i) for i in range(pixels.shape[0])]


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` images in [0, 1] (any float dtype, any device) as RGB PIL images, rounded
    exactly as diffusers' ``numpy_to_pil`` rounds."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
