"""Reading (and, for tests and exports, writing) a checkpoint folder as DeepFloyd published it:
`config.yml` with a `params:` block, and `pytorch_model.bin` or `model.safetensors`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.yml"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """An original checkpoint folder cannot be read."""


def read_params(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The `params:` mapping of `checkpoint_dir/config.yml` (keyword arguments of the original `UNetModel`)."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: expected a checkpoint folder holding {CONFIG_FILE} and weights")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected DeepFloyd's config.yml with a 'params:' block")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(config, dict) or not isinstance(config.get("params"), dict):
        raise CheckpointError(f"{path}: expected a mapping with a 'params:' block of UNetModel arguments")
    return dict(config["params"])


def weights_path(checkpoint_dir: str | Path) -> Path:
    """The weights file of `checkpoint_dir`: `model.safetensors` if present, else `pytorch_model.bin`."""
    for name in WEIGHTS_FILES:
        if (Path(checkpoint_dir) / name).is_file():
            return Path(checkpoint_dir) / name
    raise CheckpointError(f"{checkpoint_dir}: no weights; expected one of {', '.join(WEIGHTS_FILES)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file on the CPU without executing pickled code; float32, float16 or bfloat16 tensors."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:
            # Memory-mapped, so tensors not yet converted cost page cache rather than process memory.
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as error:  # torch and safetensors raise many types for truncated or corrupt files
        raise CheckpointError(f"{path}: cannot be read as a state dict, truncated or corrupt? ({error})") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected a flat mapping of parameter names to tensors")
    bad = {k: v.dtype for k, v in state_dict.items() if v.dtype not in SUPPORTED_DTYPES}
    if bad:
        raise CheckpointError(
            f"{path}: tensors {sorted(bad)[:5]} have dtypes {set(bad.values())}; expected fp32/fp16/bf16"
        )
    return state_dict


def _is_zip(path: Path) -> bool:
    """torch's current format (a zip archive) can be memory-mapped; the legacy pickle stream cannot."""
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def write_checkpoint(
    checkpoint_dir: str | Path,
    params: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    weights_format: str = "bin",
) -> Path:
    """Write `params` and `state_dict` in DeepFloyd's layout (`weights_format` "bin" or "safetensors")."""
    if weights_format not in ("bin", "safetensors"):
        raise ValueError(f"weights_format={weights_format!r}: expected 'bin' or 'safetensors'")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / CONFIG_FILE).write_text(yaml.safe_dump({"params": params}, sort_keys=False))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if weights_format == "safetensors":
        save_file(tensors, checkpoint_dir / "model.safetensors")
    else:
        torch.save(tensors, checkpoint_dir / "pytorch_model.bin")
    return checkpoint_dir
