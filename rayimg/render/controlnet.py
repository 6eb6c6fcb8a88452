"""ControlNet helpers: canny preprocessing (numpy only), loading a ControlNetModel, and a tiny
seeded ControlNet for tests and the demo."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["canny", "build_tiny_controlnet", "load_controlnet"]

_SOBEL = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edge map as the RGB image ControlNet expects (edges 255, background 0).

    The classic algorithm with the conventions of OpenCV's ``cv2.Canny(img, low, high)`` (what
    the canny ControlNets were trained on), implemented in numpy: 3x3 Sobel gradients on the
    0..255 pixel values (for colour images, per pixel the channel with the largest gradient),
    L1 magnitude ``|gx| + |gy|``, non-maximum suppression along the gradient direction
    quantised to 0/45/90/135 degrees, and hysteresis: pixels above ``high`` are edges, pixels
    above ``low`` are edges when 8-connected to one. No smoothing is applied (neither does
    ``cv2.Canny``). Individual pixels may differ from OpenCV (its border handling and
    direction tests differ in detail); the edges are the same structure.
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny: need 0 <= low <= high, got low={low}, high={high}")
    pixels = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    gx = np.stack([_filter3(pixels[..., c], _SOBEL) for c in range(pixels.shape[-1])], -1)
    gy = np.stack([_filter3(pixels[..., c], _SOBEL.T) for c in range(pixels.shape[-1])], -1)
    magnitude_c = np.abs(gx) + np.abs(gy)
    best = magnitude_c.argmax(-1)[..., None]
    gx = np.take_along_axis(gx, best, -1)[..., 0]
    gy = np.take_along_axis(gy, best, -1)[..., 0]
    magnitude = np.take_along_axis(magnitude_c, best, -1)[..., 0]

    thin = _non_max_suppression(magnitude, gx, gy)
    strong = thin > high
    weak = thin > low
    edges = _hysteresis(strong, weak)
    out = np.where(edges, 255, 0).astype(np.uint8)
    return Image.fromarray(np.repeat(out[..., None], 3, axis=-1), mode="RGB")


def _filter3(channel: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """3x3 correlation with replicated borders."""
    padded = np.pad(channel, 1, mode="edge")
    h, w = channel.shape
    out = np.zeros_like(channel)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * padded[dy:dy + h, dx:dx + w]
    return out


def _non_max_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its magnitude is a maximum along the gradient direction."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    padded = np.pad(magnitude, 1, mode="constant")
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # Neighbour offsets (dy, dx) along each quantised direction (rows grow downwards).
    directions = [
        ((angle < 22.5) | (angle >= 157.5), (0, 1)),
        ((angle >= 22.5) & (angle < 67.5), (1, 1)),
        ((angle >= 67.5) & (angle < 112.5), (1, 0)),
        ((angle >= 112.5) & (angle < 157.5), (1, -1)),
    ]
    keep = np.zeros_like(magnitude, dtype=bool)
    for mask, (dy, dx) in directions:
        # ">" on one side and ">=" on the other breaks ties on plateaus, as OpenCV does.
        local_max = (magnitude > shifted(-dy, -dx)) & (magnitude >= shifted(dy, dx))
        keep |= mask & local_max
    return np.where(keep, magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one, plus the strong ones."""
    h, w = strong.shape
    edges = strong.copy()
    queue = deque(zip(*np.nonzero(strong)))
    while queue:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and weak[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    queue.append((ny, nx))
    return edges


def build_tiny_controlnet(unet, seed: int = 0):
    """A ControlNet derived from ``unet`` (``ControlNetModel.from_unet``) for tests and the demo.

    ``from_unet`` zero-initialises the output convolutions (a no-op ControlNet), and the
    default init of the conditioning embedding shrinks the control image's signal to almost
    nothing; here both get seeded random weights (He-normal for the embedding, small normal for
    the output convolutions) so the control image visibly steers the result.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    embedding_convs = [m for m in controlnet.controlnet_cond_embedding.modules() if isinstance(m, torch.nn.Conv2d)]
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    with torch.no_grad():
        for conv in embedding_convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    if controlnet.device != unet.device or controlnet.dtype != unet.dtype:
        controlnet.to(device=unet.device, dtype=unet.dtype)
    return controlnet.eval()


def load_controlnet(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
    """A ControlNetModel from a local diffusers-format dir (safetensors only)."""
    from diffusers import ControlNetModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers ControlNet dir (no config.json)")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    model = ControlNetModel.from_pretrained(str(path), use_safetensors=True, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()
