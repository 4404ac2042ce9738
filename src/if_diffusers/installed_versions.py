"""What the installed diffusers and transformers expect, where their releases differ, so that no call of this package
draws a deprecation warning its user cannot act on.

- `dtype_argument`: diffusers 0.40 renamed `from_pretrained(torch_dtype=)` to `dtype=` (the old name warns).
- `CLIPImageProcessor`, the class of IF's safety-checker feature extractor: transformers 5 backs that name with
  torchvision and, without torchvision, serves `CLIPImageProcessorPil` under it with a warning at the first import,
  which diffusers' own pipeline modules make. Resolved here first (this module is imported before any other of the
  package), quietly; later imports get the same class, and the warning is not repeated.
"""

from __future__ import annotations

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
    """The class, resolved once with transformers' logging at errors only: its fallback warning is logged once per
    process (`warning_once`), so this quiet first time is the only time."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return transformers.CLIPImageProcessor
    finally:
        transformers_logging.set_verbosity(verbosity)


CLIPImageProcessor = _clip_image_processor()
