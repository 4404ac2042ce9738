"""Conversion of DeepFloyd's original checkpoints to the Hugging Face hub layout."""

from .convert import ConversionError, convert_original_checkpoint
from .key_table import build_key_table, convert_state_dict
from .original_checkpoint import read_params, read_state_dict, write_checkpoint
from .release import (
    ChecksumError,
    ValidationError,
    ValidationReport,
    find_model_card,
    validate_converted,
    verify_checksums,
    write_checksums,
)

__all__ = [
    "ChecksumError",
    "ConversionError",
    "ValidationError",
    "ValidationReport",
    "build_key_table",
    "convert_original_checkpoint",
    "convert_state_dict",
    "find_model_card",
    "read_params",
    "read_state_dict",
    "validate_converted",
    "verify_checksums",
    "write_checkpoint",
    "write_checksums",
]
