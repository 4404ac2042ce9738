"""What the installed diffusers and transformers expect, where their releases differ, so that no call of this package
draws a deprecation warning its user cannot act on.

- `dtype_argument`: diffusers 0.40 renamed `from_pretrained(torch_dtype=)` to `dtype=` (the old name warns).
- `CLIPImageProcessor`, the class of IF's safety-checker feature extractor: transformers 5 backs that name with
  torchvision and, without torchvision, serves `CLIPImageProcessorPil` under it with a warning at the first import,
  which diffusers' own pipeline modules make. Resolved here first (this module is imported before any other of the
  package), so that every later import gets the same class, quietly.
"""

from __future__ import annotations

import sys

import diffusers
import torch
import transformers
from packaging.version import Version

DIFFUSERS_DTYPE_RELEASE = Version("0.40.0.dev0")


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s keyword for the weights' dtype in the installed diffusers: `{"dtype": ...}` from 0.40 on,
    `{"torch_dtype": ...}` before."""
    return {"dtype" if Version(diffusers.__version__) >= DIFFUSERS_DTYPE_RELEASE else "torch_dtype": dtype}


def _clip_image_processor() -> type:
    from transformers.utils import is_torchvision_available

    pil_fallback = "CLIPImageProcessorPil"
    if is_torchvision_available() or pil_fallback not in getattr(transformers, "_class_to_module", {}):
        return transformers.CLIPImageProcessor
    fallback = getattr(transformers, pil_fallback)
    # what transformers' own fallback does, without the warning; on the module `import transformers` now finds (the
    # lazy import of the fallback has put another module object in sys.modules)
    for module in {id(m): m for m in (transformers, sys.modules["transformers"])}.values():
        setattr(module, "CLIPImageProcessor", fallback)
    return fallback


CLIPImageProcessor = _clip_image_processor()
