"""Speed-ups applied to a loaded pipeline from outside: :func:`apply` takes a plain diffusers
pipeline and an :class:`~rayimg.config.EngineConfig` and changes the pipeline in place (memory
options, fused QKV, channels-last, float8 linears, ``torch.compile`` of the UNet and of the VAE
decoder, CUDA graphs of the text encoders' one-prompt forward, the VAE decode in chunks, a cheap
execution-device lookup). The engine generates with whatever pipeline it is given; nothing here
changes which images a request gets, except ``fp8`` (recorded in the output key).
"""

from __future__ import annotations

import os

import torch

__all__ = ["VaeDecode", "apply", "configure_compiler", "inference_only", "pin_execution_device"]

PERSISTENT_ROWS = 4096  # widest row the compiled kernels reduce in one pass (see configure_compiler)
_ROWS_CHOICES = None


def apply(pipe, settings) -> None:
    """Apply the speed and memory options of ``settings`` (an EngineConfig) to ``pipe`` in place.
    The pipeline's models become inference-only (:func:`inference_only`). Applying twice to the
    same pipeline is harmless (modules already converted are left alone)."""
    inference_only(pipe)
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    # slicing decodes one image at a time already
    VaeDecode.install(pipe.vae, 0 if settings.vae_slicing else settings.vae_batch)
    if settings.attention_slicing:
        pipe.enable_attention_slicing()
    if settings.fuse_qkv:
        pipe.fuse_qkv_projections()
    if settings.channels_last:
        # UNet only: the VAE runs eager, and eager CUDA GroupNorm returns contiguous outputs
        # (pytorch#111824), so a channels-last VAE converts layouts around every norm.
        pipe.unet.to(memory_format=torch.channels_last)
    if settings.fp8:
        from rayimg.render.fp8 import convert_unet, fp8_unavailable

        why = fp8_unavailable(pipe.unet.device, pipe.unet.dtype)
        if why:
            raise ValueError(f"engine.fp8: {why}")
        convert_unet(pipe.unet)  # after fuse_qkv: the fused projections are converted too
    if settings.compile or settings.compile_vae:
        configure_compiler()
    if settings.compile:
        # In place (nn.Module.compile): the module keeps its identity and parameter paths, so
        # FusedAdapters and the img2img/controlnet pipelines share the compiled UNet. One static
        # graph per batch and image size (dynamic=False): a second size compiles its own graph
        # instead of a slower dynamic-shape one. "reduce-overhead" replays CUDA graphs, which
        # read the weights in place, so adapter swaps need no recompile either.
        pipe.unet.compile(mode=None if settings.compile_mode == "default" else settings.compile_mode, dynamic=False)
        if settings.compile_mode == "reduce-overhead":
            from rayimg.render import text_graphs

            # a prompt's encode, alone and launch-bound like a small UNet step, replays a CUDA graph too
            text_graphs.install(pipe)
    if settings.compile_vae:
        from rayimg.render.vae_decode import speed_up_decoder

        # the decoder alone (adapters never touch it): one graph per batch and image size
        speed_up_decoder(pipe.vae)
        pipe.vae.decoder.compile(dynamic=False)
    pin_execution_device(pipe)


def inference_only(model) -> None:
    """Put a pipeline's models (or one model) in eval mode with no parameter requiring grad.

    diffusers and transformers load weights with ``requires_grad=True``, and under
    ``torch.compile`` that changes the inference graph even inside ``no_grad``: a 3-D input times
    a weight that requires grad stays a batched matmul over an expanded weight instead of one
    matmul, and inductor fuses some normalizations differently (slower). Weights change later
    only under ``no_grad`` (adapter fusing copies in place)."""
    modules = [model] if isinstance(model, torch.nn.Module) else [m for m in model.components.values() if isinstance(m, torch.nn.Module)]
    for module in modules:
        module.eval()
        module.requires_grad_(False)


# ------------------------------------------------------------------ compiler settings
def _persistent_rows_choices():
    """inductor's heuristics, except that "inner" reductions (along contiguous rows) of up to
    :data:`PERSISTENT_ROWS` elements keep the whole row in registers (persistent) instead of
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
                            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROWS))

            def uuid(self) -> str:
                return f"rayimg-persistent-rows-{PERSISTENT_ROWS}"

        _ROWS_CHOICES = PersistentRowsChoices
    return _ROWS_CHOICES()


def configure_compiler(persistent_rows: bool | None = None) -> None:
    """Process-wide torch.compile settings for the engine's graphs: room for one graph per
    batch/image size, 1x1 convolutions lowered to matmuls, and cooperative reductions (Triton),
    which split the channels-last GroupNorm statistics (few outputs over many elements) across
    thread blocks. Every choice is static, so results stay deterministic (inductor's
    ``multi_kernel``, which picks by timing at run time, could pick differently in another process).

    ``persistent_rows`` (default: on unless the environment sets ``RAYIMG_PERSISTENT_ROWS=0``):
    row reductions of up to :data:`PERSISTENT_ROWS` elements run persistent
    (:func:`_persistent_rows_choices`), which speeds up SDXL's residual add + LayerNorm (+ float8
    scaling) kernels at width 1,280."""
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
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    if hasattr(torch._inductor.config, "inductor_choices_class"):
        factory = _persistent_rows_choices if persistent_rows else None
        if torch._inductor.config.inductor_choices_class in (None, _persistent_rows_choices):
            torch._inductor.config.inductor_choices_class = factory
            V.set_choices_handler(factory() if factory else InductorChoices())  # this thread may have built its handler already
    elif persistent_rows:  # an older torch: this thread's handler only
        V.set_choices_handler(_persistent_rows_choices())


# ------------------------------------------------------------------ pipeline surgery
class VaeDecode:
    """``vae.decode`` with two additions, installed on the VAE instance by :meth:`install`:

    - ``images`` (``engine.vae_batch``; 0: off): at most that many latents are decoded at once and
      the pixels concatenated. Each image's pixels depend only on its own latents, so chunks change
      no math; a compiled decoder keeps one graph for the chunk size and its peak memory stays that
      of ``images`` images;
    - ``stream`` (set by the engine around a ``"pending"`` call on CUDA): the decode and everything
      the pipeline does after it run on that stream, which first waits for the latents. The next
      call's set-up (whose host-to-device copies synchronize the main stream) then waits only for
      the denoising steps, not for this decode.

    The pipelines call ``vae.decode`` (not ``forward``), so neither a forward hook nor a diffusers
    ``ModelHook`` (which wraps ``forward``) can do this, and replacing ``pipe.vae`` with a wrapper
    module would change the pipelines' components. An instance attribute over the class's method
    is the smallest change: the class and every other VAE are untouched."""

    def __init__(self, vae, images: int = 0):
        self.inner = type(vae).decode.__get__(vae)
        self.images = images
        self.stream = None

    @classmethod
    def install(cls, vae, images: int) -> "VaeDecode":
        """The VAE's :class:`VaeDecode` (made on first use), decoding ``images`` at a time."""
        if not isinstance(vae.decode, cls):
            vae.decode = cls(vae)
        vae.decode.images = int(images)
        return vae.decode

    def __call__(self, z, *args, **kwargs):
        if self.stream is not None and z.is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(z.device))
            z.record_stream(self.stream)  # made on the main stream, read here: kept until this stream is done with it
            torch.cuda.set_stream(self.stream)  # until the engine puts the main stream back
        if not self.images or z.shape[0] <= self.images:
            return self.inner(z, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", args[0] if args else True)
        args = args[1:]
        sample = torch.cat([self.inner(part, False, *args, **kwargs)[0] for part in z.split(self.images)])
        if not return_dict:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)


_PINNED_CLASSES: dict[type, type] = {}


def _pinned_execution_device(self):
    # offload hooks sit on the top-level modules (accelerate's _hf_hook, diffusers' group
    # offloading _diffusers_hook): with one there, ask diffusers as usual
    for model in self.components.values():
        if isinstance(model, torch.nn.Module) and (hasattr(model, "_hf_hook") or hasattr(model, "_diffusers_hook")):
            return super(type(self), self)._execution_device
    return next(self.unet.parameters()).device  # O(1), and follows a later .to()


def pin_execution_device(pipe) -> None:
    """Make ``pipe._execution_device`` the UNet's device, read from its first parameter.
    diffusers' property walks every submodule of every component looking for offload hooks at
    each pipeline call (about 3,000 modules for SDXL), host time in which the accelerator waits.

    The pipeline's own methods read ``self._execution_device``, a property looked up on the class,
    so neither a wrapper object nor a diffusers hook (those wrap a module's ``forward``; a pipeline
    is not a module) can answer it. The pipeline's class becomes a subclass (same name) that only
    overrides that property; a pipeline with offload hooks on a component still asks diffusers."""
    cls = type(pipe)
    if cls in _PINNED_CLASSES.values():
        return
    sub = _PINNED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"_execution_device": property(_pinned_execution_device),
                                          "__module__": cls.__module__, "__doc__": cls.__doc__})
        _PINNED_CLASSES[cls] = sub
    pipe.__class__ = sub
