"""Images and masks in and out of the IF pipelines, with the size rules of IF UNets.

Conventions (diffusers' IF pipelines): PIL images are RGB 0-255; numpy arrays `(B, H, W, 3)` or `(H, W, 3)` and
tensors `(B, 3, H, W)` or `(3, H, W)` are already in `[-1, 1]`. Masks are 1 where the image is to be repainted:
PIL "L" 0-255, arrays and tensors in `[0, 1]`, binarised at 0.5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import PIL_INTERPOLATION

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a list of them


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resize_keeping_aspect(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The original's resize: the short side to `size`, the long side to the nearest multiple of 8 (bicubic)."""
    width, height = image.size
    ratio = width / height
    width, height = size, size
    if ratio >= 1:
        width = int(round(size / 8 * ratio) * 8)
    else:
        height = int(round(size / 8 / ratio) * 8)
    return image.resize((width, height), resample=PIL_INTERPOLATION["bicubic"], reducing_gap=None)


def image_batch_size(image: ImageInput) -> int:
    """How many images `image` holds, without converting it."""
    if isinstance(image, (list, tuple)):
        return sum(image_batch_size(i) for i in image)
    if isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 4:
        return image.shape[0]
    return 1


def to_image_tensor(image: ImageInput, argument: str, resize_to: int | None = None) -> torch.Tensor:
    """`image` as a float32 `(B, 3, H, W)` tensor in `[-1, 1]`; PIL images are first resized with
    `resize_keeping_aspect(resize_to)` when given. Raises `ValueError` naming `argument` on a wrong type, rank,
    channel count, dtype or value range."""
    items = _as_list(image)
    if not items or not all(isinstance(i, type(items[0])) for i in items):
        raise ValueError(
            f"{argument} must be a PIL image, numpy array, tensor or a list of one of them; got {image!r:.80}"
        )
    if isinstance(items[0], PIL.Image.Image):
        arrays = [np.asarray(resize_keeping_aspect(i.convert("RGB"), resize_to) if resize_to else i.convert("RGB"))
                  for i in items]  # fmt: skip
        _check_same_size(arrays, argument, axis=(0, 1))
        return torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    if isinstance(items[0], np.ndarray):
        tensors = [torch.from_numpy(np.ascontiguousarray(i)) for i in items]
        tensors = [t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1) if t.ndim == 3 else t for t in tensors]
    elif isinstance(items[0], torch.Tensor):
        tensors = items
    else:
        raise ValueError(f"{argument} must be a PIL image, numpy array or tensor; got {type(items[0]).__name__}")
    tensors = [t[None] if t.ndim == 3 else t for t in tensors]
    for t in tensors:
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(
                f"{argument} has shape {tuple(t.shape)}; expected RGB images (B, 3, H, W) / (3, H, W) as tensors or "
                "(B, H, W, 3) / (H, W, 3) as arrays"
            )
        if not t.is_floating_point():
            raise ValueError(f"{argument} has dtype {t.dtype}; expected floating point values in [-1, 1]")
    _check_same_size(tensors, argument, axis=(2, 3))
    batch = torch.cat(tensors).float()
    low, high = batch.min().item(), batch.max().item()  # once, before any model runs
    if low < -1 - 1e-3 or high > 1 + 1e-3:
        raise ValueError(f"{argument} has values in [{low:.3f}, {high:.3f}]; expected [-1, 1] (PIL images are 0-255)")
    return batch


def to_mask_tensor(mask: ImageInput, argument: str, resize_to: int | None = None) -> torch.Tensor:
    """`mask` as a float32 `(B, 1, H, W)` tensor of 0 (keep) and 1 (repaint), binarised at 0.5."""
    items = _as_list(mask)
    if isinstance(items[0], PIL.Image.Image):
        arrays = [np.asarray(resize_keeping_aspect(i.convert("L"), resize_to) if resize_to else i.convert("L"))
                  for i in items]  # fmt: skip
        _check_same_size(arrays, argument, axis=(0, 1))
        batch = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)[:, None]
    elif isinstance(items[0], (np.ndarray, torch.Tensor)):
        tensors = [torch.as_tensor(np.ascontiguousarray(i) if isinstance(i, np.ndarray) else i) for i in items]
        # (H, W) one mask; (B, H, W) a batch unless B == 1; (B, 1, H, W) a batch
        tensors = [t[None, None] if t.ndim == 2 else t[:, None] if t.ndim == 3 else t for t in tensors]
        for t in tensors:
            if t.ndim != 4 or t.shape[1] != 1:
                raise ValueError(f"{argument} has shape {tuple(t.shape)}; expected (H, W), (B, H, W) or (B, 1, H, W)")
        _check_same_size(tensors, argument, axis=(2, 3))
        batch = torch.cat(tensors).float()
        low, high = batch.min().item(), batch.max().item()
        if low < 0 or high > 1:
            raise ValueError(f"{argument} has values in [{low:.3f}, {high:.3f}]; expected [0, 1]")
    else:
        raise ValueError(f"{argument} must be a PIL image, numpy array or tensor; got {type(items[0]).__name__}")
    return (batch >= 0.5).float()


def _check_same_size(items: list, argument: str, axis: tuple[int, int]) -> None:
    sizes = {tuple(i.shape[a] for a in axis) for i in items}
    if len(sizes) > 1:
        raise ValueError(f"{argument} mixes image sizes {sorted(sizes)}; expected one size per batch")


def size_multiple(unet) -> int:
    """Height and width an IF UNet accepts are multiples of this: one halving per downsampling level."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def check_size(height: int, width: int, multiple: int, arguments: str = "height/width") -> None:
    """Reject a size the UNet cannot take, naming the nearest sizes that work."""
    for name, value in zip(arguments.split("/"), (height, width)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            below = max(multiple, (value // multiple) * multiple) if isinstance(value, int) else multiple
            raise ValueError(
                f"{name}={value!r}: the UNet takes multiples of {multiple}; nearest sizes: {below} or {below + multiple}"
            )


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """`(B, 3, H, W)` in `[-1, 1]` -> "pt" (unchanged, for the next stage), "np" `(B, H, W, 3)` in `[0, 1]`, or
    "pil" images."""
    if output_type == "pt":
        return images
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]
