"""Prompt encoding for the SD and SDXL families, shared by prepare, train and render.

SD: the text encoder's last hidden state. SDXL (as diffusers' StableDiffusionXLPipeline does
it): the penultimate hidden states of both encoders concatenated, plus the pooled, projected
output of the second encoder.
"""

from __future__ import annotations

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(family: str, tokenizers: list, text_encoders: list, captions: list[str], device=None) -> dict[str, torch.Tensor]:
    """``{"prompt_embeds": (B, 77, D)}`` plus ``"pooled_prompt_embeds": (B, P)`` for SDXL."""
    if family == "sd":
        ids = tokenize(tokenizers[0], captions).to(device or text_encoders[0].device)
        return {"prompt_embeds": text_encoders[0](ids)[0]}
    if family != "sdxl":
        raise ValueError(f"unknown model family {family!r}")
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenize(tokenizer, captions).to(device or encoder.device)
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output
        hidden.append(out.hidden_states[-2])
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def pipeline_text_parts(pipe) -> tuple[list, list]:
    """(tokenizers, text_encoders) of a loaded pipeline, in encoding order."""
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    return tokenizers, encoders
