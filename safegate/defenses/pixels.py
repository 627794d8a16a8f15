"""Pixels of processed image inputs: SafeCoDe's noised "neutral" image, and images rebuilt for the judge.

`generate(**inputs)` only sees what the processor produced (normalised `pixel_values`, flattened patches for
Qwen-VL/Omni), so both operations undo the normalisation with the processor's mean/std (default OpenAI-CLIP,
the values Qwen-VL, Qwen-Omni and LLaVA use) and work in [0, 1] pixel space.

Example:
    >>> import torch
    >>> x = torch.zeros(1, 3, 2, 2)
    >>> y = neutral_pixels(x, 0.1, torch.Generator().manual_seed(0))
    >>> y.shape, bool((y != x).any())
    (torch.Size([1, 3, 2, 2]), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import einops
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def neutral_pixels(
    pixel_values: torch.Tensor,
    sigma: float,
    generator: torch.Generator,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    temporal_patch_size: int | None = None,
    same_over_time: bool = True,
) -> torch.Tensor:
    """The noised "neutral" image (S1) computed on processor outputs: `clip(v + N(0, sigma^2), 0, 1)` in [0, 1]
    pixel space, re-quantised to uint8 levels, normalised again.

    OUR CHOICE: the official code noises the PIL image before the processor; `generate(**inputs)` only sees
    normalised pixels, so we undo the normalisation with the processor's `image_mean`/`image_std` (default the
    OpenAI-CLIP values Qwen-VL, Qwen-Omni and LLaVA use), noise, clip, quantise and normalise again. Layouts:
    `(..., C, H, W)` (LLaVA) and Qwen's flattened patches `(N, C*T*P*P)`; with `same_over_time` the T copies of
    one image patch get the same noise, as when the noised image is processed.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.zeros(1, 3, 2, 2)
        >>> bool((neutral_pixels(x, 0.1, g) != x).any()), neutral_pixels(x, 0.1, g).shape
        (True, torch.Size([1, 3, 2, 2]))
    """
    x = pixel_values.float()
    channels = len(mean)
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    if x.dim() == 2:
        t = temporal_patch_size or 1
        if x.shape[1] % (channels * t):
            raise ValueError(
                f"`pixel_values` rows of width {x.shape[1]} are not {channels} channels x {t} frames of patches; "
                "pass `image_mean`/`image_std` and a model whose vision config has `temporal_patch_size`."
            )
        x = x.view(x.shape[0], channels, t, -1)
        m, s = m.view(1, channels, 1, 1), s.view(1, channels, 1, 1)
        noise_shape = (x.shape[0], channels, 1 if same_over_time else t, x.shape[-1])
    else:
        if x.shape[-3] != channels:
            raise ValueError(f"`pixel_values` of shape {tuple(x.shape)} do not have {channels} channels at dim -3.")
        m, s = m.view(channels, 1, 1), s.view(channels, 1, 1)
        noise_shape = tuple(x.shape)
    m, s = m.to(x.device), s.to(x.device)
    noise = torch.randn(noise_shape, generator=generator).to(x.device) * sigma
    pixels = ((x * s + m + noise).clamp(0.0, 1.0) * 255.0).round() / 255.0
    return ((pixels - m) / s).reshape(pixel_values.shape).to(pixel_values.dtype)


def image_stats(processor: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[Any, Any]:
    image_processor = getattr(processor, "image_processor", None)
    if mean is None:
        mean = getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN
    if std is None:
        std = getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD
    if image_processor is not None and getattr(image_processor, "do_normalize", True) is False:
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _to_pil(chw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is optional
        return None
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    pixels = ((chw.float().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def images_from_pixels(
    input_ids: torch.Tensor, inputs: dict[str, Any], config: Any, mean: Sequence[float], std: Sequence[float]
) -> list[Any]:
    """Best effort: the first image of each row rebuilt from processed `pixel_values` (a PIL image, or `None`).

    Handles LLaVA's `(N, C, H, W)` and the Qwen-VL/Omni flattened patches with `image_grid_thw`. Only the
    judge's captioner uses these; pass `images=` to `SafeCoDe.generate` to give the judge the originals.
    """
    pixels = inputs.get("pixel_values")
    image_id = getattr(config, "image_token_id", None)
    rows: list[Any] = [None] * input_ids.shape[0]
    if pixels is None or image_id is None:
        return rows
    counts = (input_ids == image_id).sum(-1).tolist()
    images: list[torch.Tensor] = []
    sizes: list[int] = []
    try:
        if pixels.dim() == 4:
            per = sum(counts) // max(pixels.shape[0], 1)
            images, sizes = list(pixels), [per] * pixels.shape[0]
        elif pixels.dim() == 2 and inputs.get("image_grid_thw") is not None:
            vision = getattr(config, "vision_config", None)
            p = int(getattr(vision, "patch_size", 14))
            tp = int(getattr(vision, "temporal_patch_size", 2))
            merge = int(getattr(vision, "spatial_merge_size", 2))
            start = 0
            for t, h, w in inputs["image_grid_thw"].tolist():
                n = t * h * w
                # rows are merge-window-ordered patches, columns one patch's channels x frames x pixels
                frames = einops.rearrange(
                    pixels[start : start + n],
                    "(t hb wb mh mw) (c tp ph pw) -> (t tp) c (hb mh ph) (wb mw pw)",
                    t=t, hb=h // merge, wb=w // merge, mh=merge, mw=merge, c=3, tp=tp, ph=p, pw=p,
                )  # fmt: skip
                images.append(frames[0])
                sizes.append(n // (merge * merge))
                start += n
    except (RuntimeError, ValueError):  # einops.EinopsError is a RuntimeError
        return rows
    index = 0
    for row, count in enumerate(counts):
        if count and index < len(images):
            rows[row] = _to_pil(images[index], mean, std)
        while count > 0 and index < len(images):
            count -= sizes[index]
            index += 1
    return rows
