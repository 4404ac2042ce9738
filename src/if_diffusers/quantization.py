"""A quantized T5 for the cascade: `--quantize-text-encoder int8|nf4` as diffusers' own `PipelineQuantizationConfig`
over the `text_encoder` component (T5), checked before any model loads; the bytes a module's weights take; and
torchao, where it is installed, imported without the lines its user cannot act on.

T5-v1.1-XXL is 4.8B parameters, 11.5 GB as transformers loads it in float16 (it keeps T5's feed-forward outputs,
`wo`, in float32): what keeps IF's stage I and its text encoder off a 16 GB card. Its linear layers hold all but the
32128 x 4096 embedding; the methods quantize those:

- `int8`: torchao's int8 weight-only (`Int8WeightOnlyConfig`: one scale per output row), through transformers'
  `TorchAoConfig`; activations stay in the pipeline's dtype. Runs on the CPU and on CUDA. transformers 5 quantizes
  every linear layer; transformers 4 keeps the `wo`s out, in float32.
- `nf4`: bitsandbytes' 4-bit NormalFloat (QLoRA's; blocks of 64 weights, one absmax each), computing in the
  pipeline's dtype, where the installed bitsandbytes build runs on the device (CUDA; bitsandbytes 0.50.2 also on an
  x86-64 CPU with AVX2). transformers keeps the `wo`s out, in float32.

Measured bytes and errors, on the tests' T5 and at T5-XXL's width: README, "Memory: a quantized T5"
(`scripts/measure_quantized_text_encoder.py`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
from typing import TYPE_CHECKING

import torch
from packaging.version import Version

if TYPE_CHECKING:
    from diffusers import PipelineQuantizationConfig

TEXT_ENCODER_QUANTIZATIONS = {
    "int8": ("torchao", "0.17", "torchao's int8 weight-only"),
    "nf4": ("bitsandbytes", "0.46.1", "bitsandbytes' 4-bit NormalFloat"),
}  # method: (package, its lowest version (torchao: the first built for torch >= 2.11), what it is)
OPTION = "--quantize-text-encoder"


def text_encoder_quantization(method: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                              argument: str = OPTION) -> PipelineQuantizationConfig:  # fmt: skip
    """`PipelineQuantizationConfig(quant_mapping={"text_encoder": <transformers config>})` quantizing T5 with
    `method` ("int8" or "nf4"), for `from_pretrained(..., quantization_config=)` of any of our pipelines or
    `IFCascadePipeline.from_pretrained_stages`. Checked here, before any model loads: the backend package is
    installed at a version that works, the installed transformers can load with it, and (nf4) the bitsandbytes
    build runs on `device`. `ValueError` naming `argument`, the method and what is missing otherwise. `device`
    defaults to CUDA where there is one (else the CPU), `dtype` (nf4's compute dtype) to float16 on CUDA, float32
    elsewhere."""
    from diffusers import PipelineQuantizationConfig

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if dtype is not None else torch.float16 if device.type == "cuda" else torch.float32

    if method not in TEXT_ENCODER_QUANTIZATIONS:
        raise ValueError(f"{argument} {method!r}: expected one of {sorted(TEXT_ENCODER_QUANTIZATIONS)}")
    package, lowest, what = TEXT_ENCODER_QUANTIZATIONS[method]
    named = f"{argument} {method} ({what})"
    installed = _installed_version(package)
    if installed is None or installed < Version(lowest):
        found = "not installed" if installed is None else f"{installed} installed"
        fix = "pip install 'if-diffusers[quantization]'" if method == "int8" else f"pip install '{package}>={lowest}'"
        raise ValueError(f"{named} needs {package} >= {lowest} ({found}): {fix}")
    config = _transformers_config(method, named, dtype)
    _check_loader(config, named)
    if method == "nf4":
        _check_bitsandbytes_runs(named, device, dtype)
    return PipelineQuantizationConfig(quant_mapping={"text_encoder": config})


def weight_bytes(module: torch.nn.Module) -> int:
    """The bytes `module`'s parameters and buffers take, quantized ones included: a torchao tensor by the tensors it
    holds (int8 data, scales), a bitsandbytes weight by its packed data and its quantization state (absmax per
    block, or one scale per row). Tied weights (T5's embedding) count once."""
    tensors = {id(tensor): tensor for tensor in [*module.parameters(), *module.buffers()]}
    return sum(_tensor_bytes(tensor) for tensor in tensors.values())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()  # a torchao tensor subclass: its inner tensors
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax per block and the code
    if state is not None:
        size += sum(value.numel() * value.element_size() for value in state.as_dict(packed=True).values()
                    if isinstance(value, torch.Tensor))  # fmt: skip
    scales = getattr(tensor, "SCB", None)  # bitsandbytes 8-bit: one scale per row
    return size + (scales.numel() * scales.element_size() if scales is not None else 0)


def _installed_version(package: str) -> Version | None:
    try:
        importlib.import_module(package)  # installed, and importable (a build for another platform is not)
        return Version(importlib.metadata.version(package))
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None


def _transformers_config(method: str, named: str, dtype: torch.dtype):
    """transformers' config of `method` (T5 is a transformers model: diffusers hands it to transformers' loader)."""
    import transformers

    if method == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dtype)  # fmt: skip
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


def _check_loader(config, named: str) -> None:
    """transformers' own check of its environment for `config`, the one its loader makes before the weights."""
    import transformers
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        AutoHfQuantizer.from_config(config).validate_environment(device_map=None)
    except (ImportError, RuntimeError, ValueError) as error:
        raise ValueError(
            f"{named}: transformers {transformers.__version__} cannot load with it here: {error}"
        ) from None


def _check_bitsandbytes_runs(named: str, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize a 64 x 64 block on `device`: a bitsandbytes build without code for this machine (no CUDA, a CPU
    without AVX2, a backend it was not built for) fails here, not halfway through loading T5."""
    import bitsandbytes
    import bitsandbytes.functional as functional

    try:
        functional.quantize_4bit(torch.ones(64, 64, device=device, dtype=dtype), quant_type="nf4")
    except Exception as error:  # what a build without this machine's code raises varies by backend and version
        raise ValueError(
            f"{named}: the installed bitsandbytes {bitsandbytes.__version__} cannot quantize on {device} "
            f"({type(error).__name__}: {error}); use int8, or install a bitsandbytes build for this machine"
        ) from None


def _import_torchao_quietly() -> None:
    """transformers imports torchao, where it is installed, with its first model class, and diffusers its torchao
    quantizer; on import they log what a user cannot act on: torchao's CUDA kernels failing to load under a CPU
    build of torch, torch deprecating torchao's registration of its enums, diffusers missing torchao's retired
    tensor types (for checkpoints saved quantized, which this package does not load). Imported here first, before
    any of that, with those loggers at errors only.

    diffusers 0.35 and 0.36 cannot import a model at all beside torchao 0.17 or later (their torchao quantizer
    logs torchao's moved types through a logger defined further down: NameError): an ImportError saying so, here,
    rather than diffusers' RuntimeError at the first model."""
    if importlib.util.find_spec("torchao") is None:
        return
    from diffusers.utils import logging as diffusers_logging

    loggers = {name: logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")}
    levels = {name: logger.level for name, logger in loggers.items()}
    verbosity = diffusers_logging.get_verbosity()
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    diffusers_logging.set_verbosity_error()
    try:
        importlib.import_module("torchao")
        importlib.import_module("diffusers.quantizers.torchao.torchao_quantizer")
    except ImportError:
        pass  # a broken install fails where it is used, with its own message
    except NameError as error:
        import diffusers

        raise ImportError(
            f"diffusers {diffusers.__version__} cannot import its models beside torchao "
            f"{importlib.metadata.version('torchao')} (its torchao quantizer fails: {error}; fixed in diffusers "
            "0.37): pip install 'diffusers>=0.37', or uninstall torchao (only --quantize-text-encoder int8 uses it)"
        ) from error
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        diffusers_logging.set_verbosity(verbosity)


_import_torchao_quietly()
