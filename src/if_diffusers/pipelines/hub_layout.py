"""Our pipelines on disk and on the Hub: the folder `save_pretrained` writes, and how `from_pretrained` reads it and
diffusers' own DeepFloyd folders.

A saved folder is diffusers' layout plus one small file per class of ours, each a star import of the installed
package (no model code), so that diffusers' own loader, `DiffusionPipeline.from_pretrained(folder or hub id,
trust_remote_code=True)`, builds our classes in a process that never imported `if_diffusers`:

- `model_index.json` names the pipeline as `["if_diffusers_pipeline", "<Class>"]`, with `if_diffusers_pipeline.py`
  beside it (`CUSTOM_PIPELINE_SOURCE`);
- it names each UNet of ours as a custom component, `["if_diffusers_model", "IFUNet2DConditionModel"]`, with
  `<component>/if_diffusers_model.py` (`CUSTOM_COMPONENT_SOURCE`): diffusers' `download` accepts a component
  library only when it is its own, a diffusers pipeline module, or such a file in the repo.

Folders written before the component files named UNets by module path (`["if_diffusers.models.unet_if", ...]`):
they load from a local folder with both loaders and from the Hub with ours.

Our classes read every `model_index.json` through `_dict_from_json_file` and `load_config`, the two places where
diffusers' `from_pretrained` and `download` read it, so that their own loader does the rest (hub download, dtype,
variant, device map, quantization) unchanged:

- the pair reads as the plain class name: the folder's files are not imported and no `trust_remote_code` is needed;
- a component whose `__init__` type hint is a union of a stock class and our subclass of it
  (`unet: IFUNet2DConditionModel | UNet2DConditionModel`) loads with our subclass, whether the folder names ours
  (either way) or the stock class (diffusers' DeepFloyd layout: `["diffusers", "UNet2DConditionModel"]`), unless
  it is passed.
"""

from __future__ import annotations

import json
import os
import string
import typing
from pathlib import Path
from typing import Any

import diffusers

from ..atomic_folder import atomic_folder, check_writable_folder
from ..installed_versions import (
    PORTABLE_TOKENIZERS,
    make_tokenizer_config_portable,
    pipeline_types,
    portable_tokenizer_entry,
)
from .hub_access import check_hub_access, hub_arguments

CUSTOM_PIPELINE_MODULE = "if_diffusers_pipeline"
CUSTOM_COMPONENT_MODULE = "if_diffusers_model"

_SHIM_SOURCE = string.Template('''"""The $kind of this folder, taken from the installed if-diffusers package (pip install if-diffusers).

`model_index.json` names $named as ["$module", "<Class>"]: diffusers'
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports this file and takes the class from it.
This file holds no model code; if_diffusers' own classes (`if_diffusers.IFPipeline.from_pretrained(folder)`) load
the folder without it and without trust_remote_code.
"""

try:
    from if_diffusers import *  # noqa: F403  (every public class: the one model_index.json names is among them)
except ModuleNotFoundError as error:
    if error.name != "if_diffusers":
        raise
    raise ImportError("This pipeline folder needs the if-diffusers package: pip install if-diffusers") from error


def __getattr__(name):
    import if_diffusers

    raise AttributeError(
        f"if_diffusers {if_diffusers.__version__} has no {name!r}, which this folder names: "
        "pip install -U if-diffusers"
    )
''')
"""The file beside `model_index.json` (the pipeline class) and in each UNet's folder (its class): a star import of
`if_diffusers.__all__` (so one file serves every class, later ones included), an ImportError that says
`pip install if-diffusers` when the package is missing, and a clear error when an older package lacks the class."""
CUSTOM_PIPELINE_SOURCE = _SHIM_SOURCE.substitute(kind="pipeline classes", named="its pipeline class",
                                                 module=CUSTOM_PIPELINE_MODULE)  # fmt: skip
CUSTOM_COMPONENT_SOURCE = _SHIM_SOURCE.substitute(kind="model class", named="this component's class",
                                                  module=CUSTOM_COMPONENT_MODULE)  # fmt: skip


def _plugin_classes(pipeline_class: type) -> dict[str, tuple[type, type]]:
    """`{component: (our class, the stock diffusers class it subclasses)}` from `pipeline_class.__init__`'s type
    hints: each union of a diffusers class and a subclass of it, e.g. `IFUNet2DConditionModel | UNet2DConditionModel`.
    Unions without such a pair (`UNet2DConditionModel | None`) name no plugin."""
    plugins = {}
    for name, hint in typing.get_type_hints(pipeline_class.__init__).items():
        members = [m for m in typing.get_args(hint) if isinstance(m, type)]
        pairs = [(ours, stock) for ours in members for stock in members
                 if ours is not stock and issubclass(ours, stock) and getattr(diffusers, stock.__name__, None) is stock]  # fmt: skip
        if len(pairs) > 1:
            raise TypeError(
                f"{pipeline_class.__name__}.__init__ hints {name}: {hint}, which names {len(pairs)} subclass pairs; "
                "expected one plugin class and the diffusers class it subclasses"
            )
        if pairs:
            plugins[name] = pairs[0]
    return plugins


def _is_ours(library: Any) -> bool:
    """Whether a `model_index.json` library names a module of this package (`if_diffusers.models.unet_if`)."""
    return isinstance(library, str) and library.split(".")[0] == __name__.split(".")[0]


def plain_class_name(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a `model_index.json`) with `_class_name` the plain class name where it is our pair
    `["if_diffusers_pipeline", "<Class>"]`, as diffusers' stock readers (AutoPipeline's) expect it."""
    if _is_entry(config.get("_class_name"), library=CUSTOM_PIPELINE_MODULE):
        config["_class_name"] = config["_class_name"][1]
    return config


def _is_entry(value: Any, library: str | None = None, class_name: str | None = None) -> bool:
    """Whether a `model_index.json` value is a pair `[library, class_name]` (`None` matches any)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and library in (None, value[0])
        and class_name in (None, value[1])
    )


class HubLayoutMixin:
    """Saving and loading in the hub layout of the module docstring; put it first in a `DiffusionPipeline`
    subclass's bases. Nothing here names a component: plugin classes come from the `__init__` type hints."""

    _get_signature_types = classmethod(pipeline_types)  # the type hints, read as diffusers >= 0.37 reads them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' `from_pretrained` (same arguments), with a hub id that the Hub refuses (missing, private,
        gated, no such `revision`) reported as one `HubAccessError` before anything downloads."""
        check_hub_access("pretrained_model_name_or_path", pretrained_model_name_or_path, **hub_arguments(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs: Any,
    ) -> None:
        """diffusers' `save_pretrained` (same arguments), written all at once: the folder is built beside
        `save_directory` and replaces it when complete, so a failure leaves the previous folder or none. Adds
        `if_diffusers_pipeline.py` and names it in `model_index.json` (see the module docstring).

        The save replaces the folder's contents, so `save_directory` must be new, empty, or a pipeline folder
        (holding `model_index.json`); anything else is refused. With `push_to_hub` the upload happens before the
        folder is put in place, and `repo_id` defaults to the folder's name as in diffusers."""
        path = check_writable_folder(save_directory, overwrite=True, argument="save_directory")
        if path.is_dir() and any(path.iterdir()) and not (path / "model_index.json").is_file():
            raise ValueError(
                f"save_directory={str(save_directory)!r} is a non-empty folder without model_index.json; "
                "save_pretrained replaces the folder's whole contents: pass a new or empty folder, or a pipeline folder"
            )
        if push_to_hub:  # diffusers' default repo_id is the folder's name: the real one, not the staging one
            kwargs.setdefault("repo_id", path.absolute().name)
        with atomic_folder(path, overwrite=True) as staging:
            super().save_pretrained(
                str(staging), safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size,
                push_to_hub=push_to_hub, use_flashpack=use_flashpack, **kwargs,
            )  # fmt: skip

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """diffusers' `save_config` (`model_index.json`, with the pairs from `to_json_string`), with
        `if_diffusers_pipeline.py` and each component's `if_diffusers_model.py` written first so that a push includes
        them, and the tokenizers' configs made readable by transformers 4 (`make_tokenizer_config_portable`). (A
        string path: diffusers' push splits it, even when given a `repo_id`.)"""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{CUSTOM_PIPELINE_MODULE}.py").write_text(CUSTOM_PIPELINE_SOURCE, encoding="utf-8")
        for name, entry in json.loads(self.to_json_string()).items():
            if _is_entry(entry, library=CUSTOM_COMPONENT_MODULE):
                (folder / name).mkdir(exist_ok=True)
                (folder / name / f"{CUSTOM_COMPONENT_MODULE}.py").write_text(CUSTOM_COMPONENT_SOURCE, encoding="utf-8")
            elif _is_entry(entry, "transformers") and entry[1] in PORTABLE_TOKENIZERS.values():
                make_tokenizer_config_portable(folder / name)
        super().save_config(os.fspath(save_directory), push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """The config as diffusers serialises it, with `_class_name` the pair `[CUSTOM_PIPELINE_MODULE, class]`,
        each component of ours `[CUSTOM_COMPONENT_MODULE, class]` and T5 and CLIP tokenizers named so that
        transformers 4 loads what transformers 5 saved (`portable_tokenizer_entry`): what `model_index.json` holds."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = [CUSTOM_PIPELINE_MODULE, type(self).__name__]
        for name, entry in config.items():
            if _is_entry(entry) and _is_ours(entry[0]):
                config[name] = [CUSTOM_COMPONENT_MODULE, entry[1]]
            else:
                config[name] = portable_tokenizer_entry(entry)
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """`model_index.json` as diffusers' stock loader reads DeepFloyd's folders: `_class_name` a plain name, our
        UNet classes named as the stock class. diffusers reads the file through here in `load_config` and, for hub
        ids, in `download`, which would otherwise import the custom file (demanding `trust_remote_code`) and reject a
        component library that is a module path (diffusers 0.42: "... is not a module in 'diffusers/pipelines'").
        `kwargs`: what the installed diffusers passes besides (0.35: `dduf_entries`)."""
        config = plain_class_name(super()._dict_from_json_file(json_file, **kwargs))
        for name, (ours, stock) in _plugin_classes(cls).items():
            if _is_entry(config.get(name), class_name=ours.__name__):
                config[name] = ["diffusers", stock.__name__]
        return config

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike, return_unused_kwargs: bool = False,
                    return_commit_hash: bool = False, **kwargs: Any):  # fmt: skip
        """diffusers' `load_config` of `model_index.json` (read by `_dict_from_json_file`), with each stock entry
        `["diffusers", "UNet2DConditionModel"]` of a component whose type hint names our subclass turned into our
        class's entry: `from_pretrained` then loads our class with every loading option the user passed."""
        loaded = super().load_config(pretrained_model_name_or_path, return_unused_kwargs, return_commit_hash, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        for name, (ours, stock) in _plugin_classes(cls).items():
            if _is_entry(config.get(name), "diffusers", stock.__name__):
                config[name] = [ours.__module__, ours.__name__]
        return loaded
