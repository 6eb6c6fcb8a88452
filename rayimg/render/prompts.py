"""The engine's prompt encodings: a cache of encoded texts and the step-wise prefetch.

Each text (prompt or negative prompt) is encoded alone (batch 1), exactly as the pipelines
encode a prompt, and kept in a small cache (a catalog's rows usually share one negative
prompt): an embedding depends only on its text and the text encoders' weights, never on the
batch. :meth:`PromptCache.queue` takes the next batch's texts; while the current call denoises,
its step callbacks encode them one text per step (:meth:`PromptCache.step`), on a side CUDA
stream, so a stream of batches keeps the text encoders off the accelerator's critical path.
Results never differ from encoding in place.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Iterator

import torch

__all__ = ["PromptCache"]

SIDE_STREAM_PRIORITY = -1  # high: the encoder's small kernels go ahead of the steps' queued work


class PromptCache:
    """Encoded texts of one pipeline, valid until its text encoders change.

    ``prefetch`` (default: on CUDA) lets :meth:`queue` take texts to encode in the background;
    off, it does nothing. On CPU the same bookkeeping encodes between the steps of the next call.
    ``size``: how many encoded texts are kept. ``stats`` counts texts encoded in place, encoded
    in the background and found in the cache."""

    size = 64

    def __init__(self, pipe, family: str):
        self.pipe, self.family = pipe, family
        self.prefetch = self.device.type == "cuda"
        self.stats = {"encoded": 0, "prefetched": 0, "hits": 0}
        # CUDA event: the current call's start, after every weight change (set by the engine)
        self.weights_queued = None
        self._changes = 0  # how many times the text encoders changed
        # (state, text) -> (embeds, pooled or None, made on the side stream)
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None, bool]] = OrderedDict()
        self._pending: tuple | None = None  # (state, texts) queued, not started
        self._steps: Iterator[None] | None = None  # the encoding in progress
        self._result: tuple | None = None  # (state, {text: encoding}, CUDA event or None), not collected
        self._side = None

    @property
    def device(self) -> torch.device:
        return next(self.pipe.unet.parameters()).device

    @property
    def pending(self) -> bool:
        """Whether texts are queued and not started."""
        return self._pending is not None

    def uses_cfg(self, request) -> bool:
        """Whether the pipelines run classifier-free guidance (and so need the negative prompt)."""
        return request.guidance_scale > 1 and getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None

    def _texts(self, requests) -> list[str]:
        texts = [r.prompt for r in requests]
        if self.uses_cfg(requests[0]):
            texts += [r.negative_prompt for r in requests]
        return texts

    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One text through the text encoder(s), alone, as the pipelines encode a prompt:
        ``(embeds (1, T, D), pooled (1, P) for SDXL else None)``. Textual-inversion tokens are
        expanded by diffusers' ``maybe_convert_prompt``."""
        with torch.no_grad():
            out = self.pipe.encode_prompt(prompt=[text], device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
        return (out[0], out[2]) if self.family == "sdxl" else (out[0], None)

    def invalidate(self) -> None:
        """The text encoders' weights change: encoded texts no longer hold."""
        self._changes += 1
        self._cache.clear()
        self._pending = None

    def state(self):
        """What the cache is valid for: the count of text-encoder changes, plus what can change
        outside the engine: the tokenizers' vocabularies (a textual inversion loaded through
        diffusers). ``None`` when the text encoders carry peft adapter layers (diffusers'
        ``load_lora_weights``): their scales change unseen, so nothing is cached then."""
        encoders = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        if any(e is not None and getattr(e, "peft_config", None) for e in encoders):
            return None
        tokenizers = [getattr(self.pipe, n, None) for n in ("tokenizer", "tokenizer_2")]
        return (self._changes, *(len(t) if t is not None else 0 for t in tokenizers))

    def embeds(self, requests, *, cached: bool = True) -> dict[str, torch.Tensor]:
        """``prompt_embeds`` (and the negative and pooled ones) for a pipeline call, each text
        encoded alone and cached (``cached=False``: encoded now and not kept, e.g. under
        per-request text-encoder adapters)."""
        self.collect()
        state = self.state() if cached else None
        cache = self._cache if state is not None else OrderedDict()
        for text in dict.fromkeys(self._texts(requests)):
            if (state, text) in cache:
                self.stats["hits"] += 1
            else:
                cache[(state, text)] = (*self._encode(text), False)
                self.stats["encoded"] += 1
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
        if self.uses_cfg(requests[0]):
            negative, negative_pooled = stacked([r.negative_prompt for r in requests])
            kwargs["negative_prompt_embeds"] = negative
            if negative_pooled is not None:
                kwargs["negative_pooled_prompt_embeds"] = negative_pooled
        while len(cache) > max(self.size, 0):
            cache.popitem(last=False)
        return kwargs

    def queue(self, requests) -> bool:
        """Queue the texts of ``requests`` that are not cached, for encoding during the next call;
        returns whether anything was queued (nothing is when :attr:`prefetch` is off)."""
        if not self.prefetch or not requests:
            return False
        self.collect()
        state = self.state()
        if state is None:
            return False
        texts = [t for t in dict.fromkeys(self._texts(requests)) if (state, t) not in self._cache]
        self._pending = (state, texts) if texts else None
        return bool(texts)

    def start(self) -> None:
        """Start encoding the queued texts (one per :meth:`step`). On CUDA they run on the side
        stream, after every weight change queued so far, so their kernels overlap the denoising."""
        pending, self._pending = self._pending, None
        if pending is not None and self._steps is None and self._result is None:
            self._steps = self._encode_steps(*pending, self._side_stream())

    def _side_stream(self):
        if self.device.type != "cuda":
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.device, priority=SIDE_STREAM_PRIORITY)
        if self.weights_queued is not None:
            self._side.wait_event(self.weights_queued)
        else:
            self._side.wait_stream(torch.cuda.current_stream(self.device))  # after every weight change queued so far
        return self._side

    def _encode_steps(self, state, texts: list[str], side) -> Iterator[None]:
        """One text per ``next()``, on the calling thread (no second Python thread competing for
        the GIL with the one that launches the steps) and on ``side`` (CUDA; else the current
        stream); the last one leaves the encodings and an event the main stream waits for."""
        out = {}
        for i, text in enumerate(texts):
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                out[text] = self._encode(text)
            if i == len(texts) - 1:
                self.stats["prefetched"] += len(out)
                done = None
                if side is not None:
                    done = torch.cuda.Event()
                    done.record(side)
                self._result = (state, out, done)
            yield

    def step(self, everything: bool = False) -> None:
        """Encode the next queued text of the encoding in progress (``everything``: all that is left)."""
        while self._steps is not None:
            try:
                next(self._steps)
            except StopIteration:
                self._steps = None
                return
            except BaseException:
                steps, self._steps = self._steps, None
                steps.close()
                raise
            if not everything:
                return

    def collect(self) -> None:
        """Finish a background encoding and put what it made into the cache."""
        self.step(everything=True)
        result, self._result = self._result, None
        if result is None:
            return
        state, out, done = result
        if done is not None:  # encoded on the side stream: ordered, not waited for
            torch.cuda.current_stream(self.device).wait_event(done)
        if state != self.state():
            return
        for text, (embeds, pooled) in out.items():
            self._cache.setdefault((state, text), (embeds, pooled, done is not None))
