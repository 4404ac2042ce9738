"""Conversion of DeepFloyd's original checkpoints to the Hugging Face hub layout."""

from .convert import ConversionError, convert_original_checkpoint
from .key_table import build_key_table, convert_state_dict
from .original_checkpoint import read_params, read_state_dict, write_checkpoint

__all__ = [
    "ConversionError",
    "build_key_table",
    "convert_original_checkpoint",
    "convert_state_dict",
    "read_params",
    "read_state_dict",
    "write_checkpoint",
]
