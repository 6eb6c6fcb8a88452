"""A faster compiled VAE decoder (``engine.compile_vae``): the same math as diffusers' decoder,
computed differently in two places where inductor's own kernels run far below the GPU's rates:

- :class:`ChannelStatsGroupNorm`: the GroupNorm statistics as a mean and variance per channel,
  combined per group exactly (the group mean is the mean of its channel means, the group variance
  the mean of the channel variances plus the variance of the channel means). On CUDA the channel
  sums and sums of squares come from two cuBLAS products (``x · 1`` and the diagonal of ``x xᵀ``,
  float32 accumulation), which read the tensor at memory speed in either layout; inductor's own
  GroupNorm reduction and a per-channel ``var_mean`` read a channels-last tensor a few channels
  at a time;
- :class:`ScoresAttnProcessor`: the mid block's single-head attention (head dim 512, 16,384 tokens
  at 1024²: of the fused kernels only PyTorch's slower memory-efficient one takes it) as two cuBLAS
  GEMMs around a softmax, a few images at a time: scores in float32 (as a fused attention keeps
  them), probabilities rounded to the value dtype (as a fused attention feeds its second product).

Pixels differ from diffusers' decoder only by the order of float32 sums and one rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelStatsGroupNorm", "ScoresAttnProcessor", "attention_scores", "speed_up_decoder"]

SCORES_BYTES = 2 << 30  # float32 scores held at once by ScoresAttnProcessor (per chunk of images × heads)


class ChannelStatsGroupNorm(nn.GroupNorm):
    """An ``nn.GroupNorm`` (converted in place by :func:`speed_up_decoder`; parameters and state
    dict unchanged) whose statistics come from per-channel ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g = self.num_groups
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # two cuBLAS products that read x once each, in whatever layout it has: the channel sums
            # (x · 1) and the channel sums of squares (the diagonal of x xᵀ), accumulated in float32
            xf = x.flatten(2)  # (N, C, L)
            length = xf.shape[2]
            ones = torch.ones(1, length, 1, device=x.device, dtype=x.dtype).expand(n, length, 1)
            mean_c = torch.ops.aten.bmm.dtype(xf, ones, torch.float32).squeeze(2) / length
            sq_c = torch.diagonal(torch.ops.aten.bmm.dtype(xf, xf.transpose(1, 2), torch.float32), dim1=1, dim2=2) / length
            var_c = (sq_c - mean_c.square()).clamp(min=0)
        else:
            var_c, mean_c = torch.var_mean(x.float(), dim=tuple(range(2, x.ndim)), correction=0)  # (N, C)
        mean_c, var_c = mean_c.view(n, g, c // g), var_c.view(n, g, c // g)
        mean_g = mean_c.mean(dim=2, keepdim=True)
        var_g = var_c.mean(dim=2, keepdim=True) + (mean_c - mean_g).square().mean(dim=2, keepdim=True)
        rstd = torch.rsqrt(var_g + self.eps)  # (N, G, 1)
        a = rstd.expand(n, g, c // g).reshape(n, c)
        b = -(mean_g * rstd).expand(n, g, c // g).reshape(n, c)
        if self.affine:
            a, b = a * self.weight.float(), b * self.weight.float() + self.bias.float()
        shape = (n, c) + (1,) * (x.ndim - 2)
        return (x.float() * a.view(shape) + b.view(shape)).to(x.dtype)


def attention_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for ``(B, H, S, D)`` tensors, without a fused kernel: float32
    scores from one GEMM, the softmax, the probabilities in ``v``'s dtype times ``v`` in a second
    GEMM, for as many (image, head) pairs at a time as :data:`SCORES_BYTES` of scores allow (SDPA
    when even one pair's scores would not fit: 2048² images and up)."""
    b, h, s, d = q.shape
    t = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    if s * t * 4 > SCORES_BYTES:  # one pair's scores alone too large (a large image): the fused kernel
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    q3, k3, v3 = q.reshape(b * h, s, d), k.reshape(b * h, t, d), v.reshape(b * h, t, v.shape[-1])
    chunk = max(1, min(b * h, SCORES_BYTES // (s * t * 4)))
    outs = []
    for i in range(0, b * h, chunk):
        qi, ki = q3[i:i + chunk], k3[i:i + chunk].transpose(1, 2)
        if qi.is_cuda and qi.dtype in (torch.bfloat16, torch.float16):
            scores = torch.ops.aten.bmm.dtype(qi, ki, torch.float32)
        else:
            scores = torch.bmm(qi.float(), ki.float())
        p = torch.softmax(scores * scale, dim=-1).to(v.dtype)
        outs.append(torch.bmm(p, v3[i:i + chunk]))
    return torch.cat(outs).view(b, h, s, v.shape[-1])


class ScoresAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for a plain self-attention (no mask, no spatial norm, no
    cross-attention: the VAE's), with :func:`attention_scores` in place of SDPA; anything else goes
    to ``AttnProcessor2_0`` itself."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or args or kwargs):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = attention_scores(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def speed_up_decoder(vae: nn.Module, group_norms: bool = True, attention: bool = True) -> dict[str, int]:
    """Convert the VAE decoder's GroupNorms to :class:`ChannelStatsGroupNorm` and give its
    attentions :class:`ScoresAttnProcessor`, in place; returns how many of each."""
    from diffusers.models.attention_processor import Attention

    decoder = getattr(vae, "decoder", vae)
    decoder = getattr(decoder, "_orig_mod", decoder)
    counts = {"group_norms": 0, "attentions": 0}
    for module in decoder.modules():
        if group_norms and type(module) is nn.GroupNorm:
            module.__class__ = ChannelStatsGroupNorm
            counts["group_norms"] += 1
        elif attention and isinstance(module, Attention) and not module.is_cross_attention:
            module.set_processor(ScoresAttnProcessor())
            counts["attentions"] += 1
    return counts
