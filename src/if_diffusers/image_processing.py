"""Images and masks in and out of the IF pipelines, with the size rules of IF UNets.

Conventions (diffusers' IF pipelines): PIL images are RGB 0-255; numpy arrays `(B, H, W, 3)` or `(H, W, 3)` and
tensors `(B, 3, H, W)` or `(3, H, W)` are already in `[-1, 1]`. Masks are 1 where the image is to be repainted:
PIL "L" 0-255, arrays and tensors in `[0, 1]`, binarised at 0.5. Anything else is rejected with a `ValueError` naming
the argument, never rescaled or reshaped silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import PIL_INTERPOLATION

ImageInput = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | a list of them
# Image files read as training data and counted as images of a dataset folder (datasets' imagefolder takes these too).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_image(path, mode: str, argument: str) -> PIL.Image.Image:
    """The image file `path`, decoded in full (a truncated file fails here) and converted to `mode` ("RGB", "L");
    ValueError naming `argument` for a file that is missing or not an image."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, PIL.UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise ValueError(f"{argument} {str(path)!r}: cannot read the image ({error})") from None


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
    """`image` as a float32 `(B, 3, H, W)` tensor in `[-1, 1]`, with diffusers' IF conventions: PIL images (0-255,
    first resized with `resize_keeping_aspect(resize_to)` when given), numpy arrays `(B, H, W, 3)` / `(H, W, 3)` and
    tensors `(B, 3, H, W)` / `(3, H, W)` already in `[-1, 1]`, or a list of one kind of them.

    Raises `ValueError` naming `argument` on a wrong type, shape, channel count, dtype (integer arrays would be
    0-255 pixels: ambiguous) or a value outside `[-1, 1]` (or not finite), rather than rescaling anything.
    """
    items = _items(image, argument, "a PIL image, a numpy array or a tensor in [-1, 1]")
    if isinstance(items[0], PIL.Image.Image):
        arrays = [np.asarray(resize_keeping_aspect(i.convert("RGB"), resize_to) if resize_to else i.convert("RGB"))
                  for i in items]  # fmt: skip
        _check_sizes([a.shape[:2] for a in arrays], argument)
        return torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    tensors = []
    for item in items:
        is_array = isinstance(item, np.ndarray)
        if item.ndim not in (3, 4) or item.shape[-1 if is_array else -3] != 3:
            layouts = "(B, H, W, 3) or (H, W, 3) as arrays" if is_array else "(B, 3, H, W) or (3, H, W) as tensors"
            raise ValueError(f"{argument} has shape {tuple(item.shape)}; expected RGB images {layouts}")
        tensor = torch.from_numpy(np.ascontiguousarray(item)).movedim(-1, -3) if is_array else item
        if not tensor.is_floating_point():
            raise ValueError(
                f"{argument} has dtype {item.dtype}; expected floating point values in [-1, 1] (0-255 pixels: pass "
                "PIL images, or x / 127.5 - 1)"
            )
        tensors.append(tensor if tensor.ndim == 4 else tensor[None])
    _check_sizes([t.shape[-2:] for t in tensors], argument)
    batch = torch.cat([t.float() for t in tensors])
    _check_range(batch, argument, -1.0, "(0-255 pixels: pass PIL images, or x / 127.5 - 1; [0, 1] images: x * 2 - 1)")
    return batch


def to_mask_tensor(mask: ImageInput, argument: str, resize_to: int | None = None) -> torch.Tensor:
    """`mask` as a float32 `(B, 1, H, W)` tensor of 0 (keep) and 1 (repaint), binarised at 0.5 as diffusers does.

    PIL images (any mode, read as "L" 0-255; resized like the image when `resize_to` is given), or arrays/tensors
    in `[0, 1]` shaped `(H, W)` (one mask), `(B, H, W)` or `(B, 1, H, W)` (a batch), or a list of one kind of them.
    Raises `ValueError` naming `argument` on a wrong type or shape, or values outside `[0, 1]` (0-255 masks are not
    rescaled silently).
    """
    items = _items(mask, argument, "a PIL image, a numpy array or a tensor in [0, 1]")
    if isinstance(items[0], PIL.Image.Image):
        arrays = [np.asarray(resize_keeping_aspect(i.convert("L"), resize_to) if resize_to else i.convert("L"))
                  for i in items]  # fmt: skip
        _check_sizes([a.shape for a in arrays], argument)
        return (torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)[:, None] >= 0.5).float()
    tensors = []
    for item in items:
        if item.ndim not in (2, 3, 4) or (item.ndim == 4 and item.shape[1] != 1):
            raise ValueError(
                f"{argument} has shape {tuple(item.shape)}; expected one channel, 1 where to repaint: (H, W) for one "
                "mask, (B, H, W) or (B, 1, H, W) for a batch"
            )
        tensor = torch.as_tensor(np.ascontiguousarray(item) if isinstance(item, np.ndarray) else item)
        tensors.append(tensor[None, None] if tensor.ndim == 2 else tensor[:, None] if tensor.ndim == 3 else tensor)
    _check_sizes([t.shape[-2:] for t in tensors], argument)
    batch = torch.cat([t.float() for t in tensors])
    _check_range(batch, argument, 0.0, "(0-255 masks: pass PIL images, or divide by 255)")
    return (batch >= 0.5).float()


def _items(value: ImageInput, argument: str, expected: str) -> list:
    """`value` as a non-empty list of one kind of image (PIL, numpy or torch)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    kinds = {
        next((k for k in (PIL.Image.Image, np.ndarray, torch.Tensor) if isinstance(i, k)), type(i)) for i in items
    }
    if len(kinds) != 1 or not kinds <= {PIL.Image.Image, np.ndarray, torch.Tensor}:
        given = "an empty list" if not items else ", ".join(sorted(k.__name__ for k in kinds))
        raise ValueError(f"{argument} must be {expected}, or a list of one kind of them; got {given}")
    return items


def _check_sizes(sizes: list, argument: str) -> None:
    """One non-empty `(H, W)` for the whole batch."""
    sizes = {tuple(int(s) for s in size) for size in sizes}
    if len(sizes) > 1:
        raise ValueError(f"{argument} mixes image sizes {sorted(sizes)}; expected one size per batch")
    if 0 in next(iter(sizes)):
        raise ValueError(f"{argument} has size {next(iter(sizes))}; expected a non-empty image")


def _check_range(batch: torch.Tensor, argument: str, low_bound: float, hint: str) -> None:
    """Values finite and in `[low_bound, 1]` (with float16 rounding slack); one host sync, before any model runs."""
    if not torch.isfinite(batch).all():
        raise ValueError(f"{argument} has NaN or infinite values; expected values in [{low_bound:g}, 1]")
    low, high = batch.min().item(), batch.max().item()
    if low < low_bound - 1e-3 or high > 1 + 1e-3:
        raise ValueError(f"{argument} has values in [{low:.4g}, {high:.4g}]; expected [{low_bound:g}, 1] {hint}")


def size_multiple(unet) -> int:
    """Height and width an IF UNet accepts are multiples of this: one halving per downsampling level."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def check_size(height: int, width: int, multiple: int, arguments: str = "height/width", note: str = "") -> None:
    """Reject a size the UNet cannot take (not a positive int multiple of `multiple`), naming the nearest sizes that
    work. `arguments` names the two values in the message; `note` is appended (how the size came about)."""
    for name, value in zip(arguments.split("/"), (height, width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{name}={value!r}: expected an int, a positive multiple of {multiple} for this UNet{note}"
            )
        if value > 0 and value % multiple == 0:
            continue
        below = value // multiple * multiple
        nearest = f"{below} or {below + multiple}" if below > 0 else f"{multiple}"
        raise ValueError(
            f"{name}={value}: the UNet takes positive multiples of {multiple} (one halving per downsampling level); "
            f"nearest sizes that work: {nearest}{note}"
        )


def super_resolution_size(height: int, width: int, multiple: int, scale: int = 4) -> tuple[int, int]:
    """A super-resolution stage's default output size: the input's `scale` times (the original's `img_scale=4`),
    floored to a multiple of `multiple` so that the UNet takes it.

    The original (`IFBaseModule._get_image_sizes`) floors to a multiple of 32: the same size for every stage-I output
    (multiples of 8), and less distortion of other aspect ratios here. 0 means the input is too small.
    """
    return height * scale // multiple * multiple, width * scale // multiple * multiple


def postprocess(images: torch.Tensor, output_type: str) -> Any:
    """`(B, 3, H, W)` in `[-1, 1]` -> "pt" (unchanged, for the next stage), "np" `(B, H, W, 3)` in `[0, 1]`, or
    "pil" images."""
    if output_type == "pt":
        return images
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    return [PIL.Image.fromarray((a * 255).round().astype("uint8")) for a in array]


def image_grid(images: list[PIL.Image.Image], columns: int = 4) -> PIL.Image.Image:
    """Same-size images in rows of `columns` (diffusers' `make_image_grid` needs a full last row)."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
