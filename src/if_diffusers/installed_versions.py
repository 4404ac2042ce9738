"""What the installed diffusers and transformers expect, where their releases differ, so that no call of this package
draws a deprecation warning its user cannot act on.

- `dtype_argument`: diffusers 0.40 renamed `from_pretrained(torch_dtype=)` to `dtype=` (the old name warns).
- `CLIPImageProcessor`, the class of IF's safety-checker feature extractor: transformers 5 backs that name with
  torchvision and, without torchvision, serves `CLIPImageProcessorPil` under it with a warning at the first import,
  which diffusers' own pipeline modules make. Resolved here first (this module is imported before any other of the
  package), quietly; later imports get the same class, and the warning is not repeated.
- `pipeline_types`: diffusers before 0.37 read `__init__` annotations unresolved, so it knew none of ours (strings,
  under `from __future__ import annotations`; `X | None` unions): it logged "cannot get type annotation" for each,
  and `from_pretrained` / `from_pipe` then failed looking them up (KeyError). `signature_types` is 0.37's reading.
- `t5_tokenizer`, `t5_tokenizer_class`, `portable_tokenizer_entry`: transformers 5 backs `T5Tokenizer` with
  `tokenizers` (`T5TokenizerFast` is its alias), builds it from a vocabulary (`vocab=`) and saves `tokenizer.json`
  alone; transformers 4's `T5Tokenizer` is sentencepiece's and reads only `spiece.model`, its `T5TokenizerFast` reads
  `tokenizer.json` with the same token ids. `clip_tokenizer`: transformers 4's `CLIPTokenizer` reads its vocabulary
  and merges from files only.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from packaging.version import Version

DIFFUSERS_DTYPE_RELEASE = Version("0.40.0.dev0")
DIFFUSERS_TYPE_HINTS_RELEASE = Version("0.37.0.dev0")
TRANSFORMERS_TOKENIZERS_RELEASE = Version("5.0.0.dev0")
TRANSFORMERS_5 = Version(transformers.__version__) >= TRANSFORMERS_TOKENIZERS_RELEASE


def dtype_argument(dtype: torch.dtype | dict[str, torch.dtype]) -> dict[str, torch.dtype | dict[str, torch.dtype]]:
    """`from_pretrained`'s keyword for the weights' dtype (or `{component: dtype, "default": dtype}`) in the installed
    diffusers: `{"dtype": ...}` from 0.40 on, `{"torch_dtype": ...}` before."""
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


def signature_types(pipeline_class: type) -> dict[str, tuple[Any, ...]]:
    """`{parameter: (classes...)}` of `pipeline_class.__init__`, as diffusers 0.37's
    `DiffusionPipeline._get_signature_types` reads it (type hints resolved; `X | Y` and `Union[X, Y]` give their
    members; a parameter without a usable hint gives `(inspect.Signature.empty,)`, which diffusers skips), for
    `pipeline_types` where the installed diffusers is older."""
    hints = typing.get_type_hints(pipeline_class.__init__)
    signature = {}
    for name in list(inspect.signature(pipeline_class.__init__).parameters)[1:]:  # [0] is self
        hint = hints.get(name, inspect.Signature.empty)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            signature[name] = typing.get_args(hint)
        elif inspect.isclass(hint) or typing.get_origin(hint) in (list, dict):
            signature[name] = (hint,)
        else:
            signature[name] = (inspect.Signature.empty,)
    return signature


def pipeline_types(pipeline_class: type) -> dict[str, tuple[Any, ...]]:
    """`_get_signature_types` of our pipeline classes (`HubLayoutMixin`'s): the installed diffusers' own from 0.37
    on, `signature_types` before."""
    if Version(diffusers.__version__) >= DIFFUSERS_TYPE_HINTS_RELEASE:
        return diffusers.DiffusionPipeline._get_signature_types.__func__(pipeline_class)
    return signature_types(pipeline_class)


def t5_tokenizer(vocab: list[tuple[str, float]], **kwargs: Any) -> transformers.PreTrainedTokenizerBase:
    """transformers 5's `T5Tokenizer(vocab=vocab, **kwargs)` (a Unigram model over `(piece, score)` pairs, unknown
    id 2, words split at whitespace with "▁" prepended, "</s>" appended), built from the same `tokenizers` parts
    under transformers 4 as its `T5TokenizerFast`: both save the same `tokenizer.json` and give the same token ids."""
    if TRANSFORMERS_5:
        return transformers.T5Tokenizer(vocab=vocab, **kwargs)
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])  # fmt: skip
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    eos = kwargs.get("eos_token", "</s>")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, backend.token_to_id(eos))]
    )
    return transformers.T5TokenizerFast(tokenizer_object=backend, **kwargs)


def clip_tokenizer(vocab: dict[str, int], merges: list[str], **kwargs: Any) -> transformers.PreTrainedTokenizerBase:
    """transformers 5's `CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)`; under transformers 4 its
    `CLIPTokenizer` of the same vocabulary and merges, written to files for it to read (the tests' tiny stage III)."""
    if TRANSFORMERS_5:
        return transformers.CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        return transformers.CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), **kwargs)


def t5_tokenizer_class(folder: str | os.PathLike) -> type:
    """The class that loads the T5 tokenizer saved in `folder` with the installed transformers: `T5Tokenizer`, except
    under transformers 4 for a folder holding `tokenizer.json` without `spiece.model` (transformers 5 wrote it, or
    `t5_tokenizer` did), which its `T5TokenizerFast` reads."""
    folder = Path(folder)
    if TRANSFORMERS_5 or (folder / "spiece.model").is_file() or not (folder / "tokenizer.json").is_file():
        return transformers.T5Tokenizer
    return transformers.T5TokenizerFast


PORTABLE_TOKENIZERS = {"T5Tokenizer": "T5TokenizerFast", "CLIPTokenizer": "CLIPTokenizerFast"}


def portable_tokenizer_entry(entry: Any) -> Any:
    """A `model_index.json` entry that transformers 4 and 5 both load: transformers 5's `T5Tokenizer` and
    `CLIPTokenizer` save `tokenizer.json` alone, which transformers 4 reads only through the `...Fast` class (the same
    token ids; in transformers 5 that name is the class itself), so under transformers 5 the entry names it."""
    if TRANSFORMERS_5 and isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
        return ["transformers", PORTABLE_TOKENIZERS.get(entry[1], entry[1])]
    return entry


def make_tokenizer_config_portable(tokenizer_folder: str | os.PathLike) -> None:
    """Drop the empty `extra_special_tokens` list transformers 5 writes in `tokenizer_config.json`: transformers
    4.57 reads it as a dict and fails."""
    path = Path(tokenizer_folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("extra_special_tokens") == []:
        del config["extra_special_tokens"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
