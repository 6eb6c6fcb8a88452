"""The generation engine shared by the bulk render job and the server (plain diffusers, no Ray).

Each image's noise comes from its own seeded CPU generator, and by default each request runs
through the pipeline on its own (``EngineConfig.batch_invariant``), so an image depends only on
its own parameters, never on the batch it lands in or the worker that renders it.

Modes: ``txt2img`` (the loaded StableDiffusion(XL)Pipeline), ``img2img`` and ``controlnet``
(the matching diffusers pipelines built on the loaded pipeline's modules: shared, nothing is
copied or cast). LoRA adapters are fused into the weights in place by
:class:`~rayimg.render.adapters.FusedAdapters` (no per-step cost; a compiled UNet does not
recompile when they change); textual-inversion embeddings load through diffusers. Prompts are
encoded by :class:`~rayimg.render.prompts.PromptCache`; the speed options are applied to the
pipeline by :func:`rayimg.render.speedups.apply`.

Adapters are identified by ``(name, version, scale)``: requests carry the identity, the caller
supplies the weights with :meth:`Engine.set_adapters`, and :meth:`Engine.generate` refuses a
batch whose identity differs from what is fused, so an output key never names adapters that
were not applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from rayimg.config import EngineConfig
from rayimg.render import speedups
from rayimg.render.adapters import FusedAdapters, LoraWeights
from rayimg.render.output import PendingImage, to_pending, to_pil
from rayimg.render.prompts import PromptCache
from rayimg.render.request import MODES, AdapterId, GenerationRequest, canonical_adapters, image_digest
from rayimg.render.schedulers import make_scheduler

__all__ = ["MODES", "TEXTUAL_INVERSION_NAME", "Engine", "GenerationRequest", "PendingImage", "canonical_adapters", "image_digest"]

TEXTUAL_INVERSION_NAME = "learned_embeds.safetensors"


class Engine:
    """Wraps a loaded StableDiffusion(XL)Pipeline and generates images for requests.

    ``config``: the engine's settings (:class:`~rayimg.config.EngineConfig`; its speed and memory
    options are applied to ``pipe`` in place by :func:`rayimg.render.speedups.apply`, and the
    pipeline's models become inference-only: do not train a pipeline an engine wraps).
    ``controlnet``: a ControlNetModel for mode ``controlnet`` (named ``controlnet_id`` in
    requests). ``originals_device``: where the base copies of adapted weights live (default: with
    the weights; ``"cpu"`` saves accelerator memory at the cost of slower swaps).

    ``batch_invariant`` (from the config; may be changed between calls): an image is bit-identical
    whatever batch it is rendered in, because :meth:`generate` runs the pipeline once per request.
    Kernels are not batch invariant in general (they pick algorithms by batch size), so a true
    batched call (``False``, faster on a GPU) can differ in the last bits from the same image
    rendered alone; images then stay deterministic for a given batch, not across batches.

    :attr:`prompts` holds the encoded texts (see :class:`~rayimg.render.prompts.PromptCache`);
    :meth:`prefetch` queues the next batch's texts, encoded during the next call.
    """

    def __init__(self, pipe, config: EngineConfig | None = None, *, controlnet=None, controlnet_id: str = "",
                 originals_device: torch.device | str | None = None):
        config = dataclasses.replace(config) if config is not None else EngineConfig()
        config.validate()
        self.config = config
        self.batch_invariant = config.batch_invariant
        self.pipe = pipe
        self.family = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
        self.base_scheduler_config = pipe.scheduler.config
        speedups.apply(pipe, config)
        pipe.set_progress_bar_config(disable=True)
        if controlnet is not None:
            if controlnet.device != pipe.unet.device or controlnet.dtype != pipe.unet.dtype:
                controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
            speedups.inference_only(controlnet)
        self.controlnet = controlnet
        self.controlnet_id = controlnet_id
        self.fused = FusedAdapters(pipe, originals_device=originals_device)
        self.prompts = PromptCache(pipe, self.family)
        self._pipelines: dict[str, Any] = {"txt2img": pipe}
        self._embeddings: dict[str, tuple[str, AdapterId | None]] = {}  # token -> (sha256, identity)
        self._warm_keys: set[tuple] = set()
        self._decode_stream = None
        self._fp8 = None  # engine.fp8: the UNet's float8 copies (rayimg.render.fp8.Float8Copies), from the first swap

    @classmethod
    def from_config(cls, pipe, cfg: EngineConfig, **kwargs) -> "Engine":
        """``Engine(pipe, cfg, **kwargs)``."""
        return cls(pipe, cfg, **kwargs)

    @property
    def device(self) -> torch.device:
        # the first parameter's device: diffusers' ModelMixin.device walks every submodule
        return next(self.pipe.unet.parameters()).device

    def _decode_stream_for(self, pipe):
        """The stream a ``"pending"`` call decodes on (None: the current one): CUDA only, and not
        when the pipeline converts the VAE's weights around the decode (float16 with
        ``force_upcast``): weights the next call could read meanwhile."""
        vae = getattr(pipe, "vae", None)
        if self.device.type != "cuda" or vae is None or not isinstance(vae.decode, speedups.VaeDecode):
            return None
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            return None
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        return self._decode_stream

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
        self.prompts.collect()  # no encoding may read the text encoders while they change
        text_before = any(c.startswith("text_encoder") for c in self.fused.modified_components)
        if not adapters:
            changed = bool(self.fused.identity)
            self.fused.restore()
        else:
            changed = self.fused.apply([pair for _, pair in named], identity=canonical)
        if changed and (text_before or any(c.startswith("text_encoder") for c in self.fused.modified_components)):
            self.prompts.invalidate()
        if changed and self.config.fp8:
            if self._fp8 is None:
                from rayimg.render.fp8 import Float8Copies

                self._fp8 = Float8Copies(self.pipe.unet)
            self._fp8.refresh(self.fused.touched_parameters(), self.fused.modified_parameters())
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
        self.prompts.collect()
        self.prompts.invalidate()
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
        speedups.pin_execution_device(pipe)
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
        without waiting for the accelerator, and each ``result()`` gives the ``"pil"`` image; on
        CUDA the decode runs on a stream of its own, so the next call is set up meanwhile). All
        requests must share ``batch_key()`` and the fused adapters.

        ``while_busy``: host work (e.g. loading the next batch's adapters) run on this thread
        while the accelerator works through queued steps (CUDA graphs: no sync per step), so it
        overlaps them instead of adding to the call. A callable runs once, when the last
        denoising step is queued; an iterator (a generator yielding between parts of its work)
        advances one part per step callback, so that each part fits in the few steps the CUDA
        launch queue lets the host run ahead. Whatever is left runs after the call. On a CPU
        the parts simply run between steps. What it does must not change this call's weights.
        """
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
        if self.config.compile or self.config.compile_vae:
            speedups.configure_compiler()  # torch keeps these per thread: a server calls from several
        if self.batch_invariant:
            return [image for i, r in enumerate(requests)
                    for image in self._call(pipe, [r], output_type, while_busy if i == len(requests) - 1 else None)]
        return self._call(pipe, requests, output_type, while_busy)

    def _call(self, pipe, requests: list[GenerationRequest], output_type: str,
              while_busy: Callable[[], Any] | Iterator[Any] | None = None) -> list:
        first = requests[0]
        # A fresh scheduler per call: schedulers carry per-run state (step index, model outputs).
        pipe.scheduler = make_scheduler(first.scheduler, self.base_scheduler_config)
        if first.mode != "img2img" and hasattr(pipe.scheduler, "set_begin_index"):
            # a full schedule starts at index 0: the scheduler then skips its lookup of the first
            # timestep in the schedule, a device-to-host sync that would make the host wait for
            # the previous call's decode before queuing this call's first step (img2img sets its own)
            pipe.scheduler.set_begin_index(0)
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        kwargs: dict[str, Any] = dict(
            **self.prompts.embeds(requests),
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            output_type=output_type,
        )
        key = first.batch_key() + (len(requests),)
        warm = key in self._warm_keys
        self.prompts.weights_queued = None
        busy = [while_busy] if while_busy is not None else []  # until done: in step callbacks, else after the call
        if self.prompts.pending and warm or while_busy is not None:

            def on_step_end(pipe_, i, t, outputs):
                if i == 0 and warm:
                    # the next batch's prompts are encoded once this call's first step is queued:
                    # the CPU then runs ahead of the accelerator (and the compiled graphs exist)
                    self.prompts.start()
                self.prompts.step()  # one text per step
                if busy and (not callable(busy[0]) or i >= getattr(pipe_, "num_timesteps", 0) - 1):
                    self._advance_while_busy(busy, warm)
                return outputs

            kwargs["callback_on_step_end"] = on_step_end
            if self.device.type == "cuda":
                # every weight change is queued by now: a background encoding waits for this
                # point of the stream, not for the steps queued before it starts
                self.prompts.weights_queued = torch.cuda.Event()
                self.prompts.weights_queued.record(torch.cuda.current_stream(self.device))
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
            stream = self._decode_stream_for(pipe)  # None: the decode stays on the current stream
            if stream is not None:
                main = torch.cuda.current_stream(self.device)
                pipe.vae.decode.stream = stream
            try:
                images = to_pending(pipe(**kwargs).images)  # on the decode stream (if any) from the decode on
            finally:
                if stream is not None:
                    pipe.vae.decode.stream = None
                    torch.cuda.set_stream(main)
        elif output_type != "pil":
            images = list(pipe(**kwargs).images)
        else:
            # PIL through device-side rounding: the same math as diffusers' "pil" output
            # ((x * 255).round() in float32 after its denormalisation), but the float image never
            # crosses to the CPU: only uint8 pixels do (a quarter of the bytes, no numpy passes).
            kwargs["output_type"] = "pt"
            images = to_pil(pipe(**kwargs).images)
        self._warm_keys.add(key)
        self.prompts.weights_queued = None  # set_adapters may change weights before the next call
        while busy:  # what the step callbacks did not finish
            self._advance_while_busy(busy, True)
        if self.prompts.pending and "callback_on_step_end" in kwargs:
            self.prompts.start()  # the call ended before its first step callback (no steps run)
        return images

    def _advance_while_busy(self, busy: list, start_prefetch: bool) -> None:
        """Run the ``while_busy`` work (a callable: all of it; an iterator: its next part); once it
        is done an encoding it queued (:meth:`prefetch`) starts at once, not a call later."""
        work = busy[0]
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
        if not busy and start_prefetch and self.prompts.pending:
            self.prompts.start()

    # ------------------------------------------------------------------ prompts
    def prefetch(self, requests: list[GenerationRequest], adapters: Sequence[tuple[LoraWeights, float]] | None = None) -> bool:
        """Queue the texts of ``requests`` (the batch that comes next) for encoding during the next
        :meth:`generate` call (or at once, when called from its ``while_busy`` work), so the call
        after it finds them cached. Returns whether anything was queued: nothing is when
        ``prompts.prefetch`` is off, when every text is cached, or when the requests' adapters are
        not the ones fused and the swap to them may change the text encoders. ``adapters``: the
        ``(weights, scale)`` the requests will be rendered with; when neither they nor the fused
        set have text-encoder layers, the swap leaves the encoders alone and the texts are queued.
        An encoding made stale by a later change of the encoders is dropped."""
        if not requests:
            return False
        try:
            self._check_adapters(requests[0].adapters)
        except ValueError:
            if adapters is None or self._swap_touches_text_encoders(adapters):
                return False
        return self.prompts.queue(requests)

    def _swap_touches_text_encoders(self, adapters: Sequence[tuple[LoraWeights, float]]) -> bool:
        """Whether fusing ``adapters`` in place of the fused set may change the text encoders."""
        if any(c.startswith("text_encoder") for c in self.fused.modified_components):
            return True
        return any(c.startswith("text_encoder") and modules for weights, _ in adapters for c, modules in weights.layers.items())
