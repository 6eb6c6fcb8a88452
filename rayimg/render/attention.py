"""Self-attention with q, k and v packed for cuDNN's attention kernel.

diffusers' processors hand ``scaled_dot_product_attention`` q/k/v as transposed views of the
projections ((B, N, H·D) seen as (B, H, N, D)). :class:`PackedSelfAttnProcessor` makes them
one contiguous (3, B, H, N, D) block first (one copy, fused into the projection's epilogue by
``torch.compile``), the layout cuDNN's fused attention reads at full speed. Used by the engine
with ``attention_backend: cudnn``, on self-attention only: cross-attention to 77 text tokens
gains nothing from cuDNN (bench/attention_bench.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["PackedSelfAttnProcessor", "pack_self_attention"]


class PackedSelfAttnProcessor:
    """Self-attention (``encoder_hidden_states is None``) of a diffusers ``Attention`` with
    q/k/v packed contiguous. Anything else (cross-attention, masks, group/spatial norms, q/k
    norms, 4-D inputs) goes to ``fallback``, the processor the module had."""

    def __init__(self, fallback):
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 or args or kwargs
                or attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None or attn.norm_k is not None):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            qkv = attn.to_qkv(hidden_states)
        else:
            qkv = torch.cat([attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)], dim=-1)
        head_dim = qkv.shape[-1] // 3 // heads
        query, key, value = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def pack_self_attention(model: torch.nn.Module) -> int:
    """Give every self-attention module (``attn1`` of the transformer blocks) of ``model`` a
    :class:`PackedSelfAttnProcessor` over its current processor; returns how many. Call after
    ``fuse_qkv_projections`` (which replaces processors)."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith(".attn1") and hasattr(module, "set_processor"):
            current = module.get_processor() if hasattr(module, "get_processor") else module.processor
            if not isinstance(current, PackedSelfAttnProcessor):
                module.set_processor(PackedSelfAttnProcessor(current))
                count += 1
    return count
