"""Regional compilation: ``torch.compile`` each block a diffusers UNet repeats instead of the whole
UNet, so a cold compile traces and compiles a few distinct blocks once each (one graph per block
class and shape) rather than one graph of the whole network."""

from __future__ import annotations

from torch import nn

# diffusers' own list (``_repeated_blocks``) names only the transformer blocks, which would leave
# every ResNet block's GroupNorm/SiLU chain eager.
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def compile_regions(unet: nn.Module, **compile_kwargs) -> int:
    """Compile each of ``unet``'s :data:`REGIONAL_BLOCKS` in place (``nn.Module.compile``, so
    parameter names, state dicts and exports are unchanged), with ``compile_kwargs`` (mode,
    dynamic, ...). Returns how many modules were compiled; ValueError when the UNet has none."""
    import torch._dynamo

    # one block class runs at several widths, resolutions and batch sizes: one graph each (a
    # block past the limit would run eager)
    for name, least in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(least, getattr(torch._dynamo.config, name)))
    compiled = 0
    for module in unet.modules():
        if type(module).__name__ in REGIONAL_BLOCKS:
            module.compile(**compile_kwargs)
            compiled += 1
    if not compiled:
        raise ValueError(f"found none of {', '.join(REGIONAL_BLOCKS)} in {type(unet).__name__}")  # the caller names its setting
    return compiled
