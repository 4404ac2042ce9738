"""One call to go fast: `pipe.enable_compile()` compiles every UNet of a stage pipeline or of the cascade with
`torch.compile` and puts it in channels_last; `pipe.disable_compile()` undoes both.

The UNets are compiled in place (`nn.Module.compile`): state-dict keys and `save_pretrained` stay the stock ones, and
the stage pipelines the cascade builds over the same modules run the one compiled UNet. The text encoders run once
per call and are left eager.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging

logger = logging.get_logger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Cache entries allowed per compiled module: static shapes, dynamic shapes, and as many again for other regimes
# (another dtype, grad on) before dynamo's limit stops recompiling.
RECOMPILES_PER_MODULE = 4


def _known_backends() -> list[str]:
    return torch._dynamo.list_backends(exclude_tags=())


def _check_compile_arguments(mode: str, regional: bool, channels_last: bool, fullgraph: bool, dynamic: bool | None,
                             backend: str | Callable, warmup: dict[str, Any] | None) -> None:  # fmt: skip
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {COMPILE_MODES}")
    for name, value in (("regional", regional), ("channels_last", channels_last), ("fullgraph", fullgraph)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected True or False")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise ValueError(f"dynamic={dynamic!r}: expected None, True or False")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"mode={mode!r} with backend={backend!r}: modes other than 'default' are inductor's")
    if isinstance(backend, str) and backend not in _known_backends():
        raise ValueError(f"backend={backend!r}: expected a torch.compile backend, one of {_known_backends()}")
    if not isinstance(backend, str) and not callable(backend):
        raise ValueError(f"backend={backend!r}: expected a backend name or a callable backend")
    if warmup is not None and not isinstance(warmup, dict):
        raise ValueError(f"warmup={warmup!r}: expected a dict of pipeline call arguments, or None")


def _offload_hooks(unet: torch.nn.Module) -> tuple[bool, bool]:
    """(model offload hook on the UNet itself, per-layer hooks inside it: sequential offload)."""
    inner = any(hasattr(module, "_hf_hook") for module in unet.modules() if module is not unet)
    return hasattr(unet, "_hf_hook"), inner


def repeated_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules regional compilation compiles: those whose class `unet._repeated_blocks` names (diffusers'
    `compile_repeated_blocks` convention)."""
    names = set(getattr(unet, "_repeated_blocks", ()) or ())
    return [module for module in unet.modules() if type(module).__name__ in names]


def _raise_recompile_limits(compiled_modules: int) -> None:
    """Every module compiled with `nn.Module.compile` shares one code object (`Module._call_impl`), whose cache holds
    an entry per compiled module and shape regime (static, then dynamic), and per distinct block in regional mode:
    raise dynamo's limits (8 entries by default; past it, `fullgraph` fails) to hold them all. Never lowered: other
    pipelines' compiled modules, and the entries already cached, still count."""
    config, needed = torch._dynamo.config, RECOMPILES_PER_MODULE * compiled_modules
    # torch < 2.7 names them cache_size_limit and accumulated_cache_size_limit
    names = ("recompile_limit", "accumulated_recompile_limit")
    if not hasattr(config, names[0]):
        names = ("cache_size_limit", "accumulated_cache_size_limit")
    for name in names:
        if getattr(config, name) < needed:
            logger.info(f"enable_compile: torch._dynamo.config.{name} raised from {getattr(config, name)} to {needed} "
                        f"for {compiled_modules} compiled modules")  # fmt: skip
            setattr(config, name, needed)


# Set on a UNet that enable_compile put in channels_last, so that disable_compile (from any pipeline sharing it)
# gives it back its layout.
_CHANNELS_LAST_MARK = "_if_diffusers_channels_last_by_enable_compile"


def _compiled_modules(unet: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in unet.modules() if module._compiled_call_impl is not None]


class CompileMixin:
    """`enable_compile()` / `disable_compile()` for `DiffusionPipeline`s whose UNets are `UNet2DConditionModel`s.

    The state lives on the UNets (compiled modules, a channels_last mark), not on the pipeline: pipelines sharing a
    UNet (a cascade and its stage pipelines, `Pipeline(**pipe.components)`) see and undo the same compilation."""

    def _compilable_unets(self) -> dict[str, UNet2DConditionModel]:
        return {name: component for name, component in self.components.items()
                if isinstance(component, UNet2DConditionModel)}  # fmt: skip

    @property
    def is_compiled(self) -> bool:
        """Whether a UNet of this pipeline (or any of its blocks) is compiled."""
        return any(_compiled_modules(unet) for unet in self._compilable_unets().values())

    def _whole_compiled_unets(self) -> list[str]:
        return [name for name, unet in self._compilable_unets().items() if unet._compiled_call_impl is not None]

    def enable_compile(
        self,
        mode: str = "default",
        *,
        regional: bool = False,
        channels_last: bool = True,
        fullgraph: bool = True,
        dynamic: bool | None = None,
        backend: str | Callable = "inductor",
        warmup: dict[str, Any] | None = None,
    ) -> None:
        """Compile every UNet of this pipeline with `torch.compile`, in channels_last memory format. The outputs equal
        the eager pipeline's within float tolerance; `disable_compile()` restores the eager UNets.

        The first call at a new batch size or resolution compiles (the cold start, README "Speed": on a 2-core CPU
        60 to 90 s per UNet of the bundled model; a change of batch size or resolution recompiles once with dynamic
        shapes, then no more). Later calls with other prompts, seeds or step counts reuse the compiled code; guidance
        switched on or off, or a positive prompt, changes the UNet's batch (as another batch size does). dynamo's
        recompile limits (`torch._dynamo.config.recompile_limit`, 8) count the entries of every compiled module
        together: they are raised to 4 per compiled module, and never lowered.

        Args:
            mode: `torch.compile`'s mode: "default"; "reduce-overhead" (CUDA graphs: the least launch overhead on a
                GPU, at the cost of static-shape memory pools); "max-autotune" (autotuned kernels and CUDA graphs:
                the longest cold start); "max-autotune-no-cudagraphs". Modes other than "default" are inductor's.
            regional: compile each repeated block (ResNet blocks and attention: `unet._repeated_blocks`) instead of
                each whole UNet: the way to combine compilation with `enable_model_cpu_offload()`, whose hook sits on
                the whole UNet. IF's blocks differ from level to level, so each distinct one compiles: no shorter a
                cold start than whole UNets (README "Speed").
            channels_last: put the UNets' weights in channels_last (their convolutions' fast layout on GPUs).
            fullgraph: fail on a graph break instead of splitting the graph (every IF UNet traces as one graph).
            dynamic: `torch.compile`'s `dynamic`; `None` compiles static shapes first and goes dynamic on the first
                change.
            backend: `torch.compile`'s backend; "inductor" is the one that speeds up.
            warmup: arguments of one call of this pipeline made now (`self(**warmup)`), so that the first real call
                does not pay the cold start; give it the real calls' batch size and image size. If it fails, the
                compilation is undone and the error raised.

        Raises:
            ValueError: on a bad argument, or with sequential CPU offload (its per-layer hooks move weights inside
                every block), or a whole-UNet compile with model CPU offload (use `regional=True`).
        """
        _check_compile_arguments(mode, regional, channels_last, fullgraph, dynamic, backend, warmup)
        unets = self._compilable_unets()
        if not unets:
            raise ValueError(f"{type(self).__name__} has no UNet2DConditionModel component to compile")
        for name, unet in unets.items():
            on_unet, inside = _offload_hooks(unet)
            if inside:
                raise ValueError(
                    f"{name} has per-layer offload hooks (enable_sequential_cpu_offload): they move weights inside "
                    "every block, which a compiled graph cannot hold; use enable_model_cpu_offload() or no offload"
                )
            if on_unet and not regional:
                raise ValueError(
                    f"{name} has the model CPU offload hook, which a whole-UNet graph would have to trace: pass "
                    "regional=True (the blocks inside are compiled, the hook stays eager)"
                )
            if regional and not repeated_blocks(unet):
                raise ValueError(
                    f"{name} ({type(unet).__name__}) declares no repeated blocks to compile (_repeated_blocks="
                    f"{getattr(unet, '_repeated_blocks', None)!r}); pass regional=False"
                )
        self.disable_compile()
        options = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
        compiled = 0
        for unet in unets.values():
            if channels_last and unet.conv_in.weight.is_contiguous():
                unet.to(memory_format=torch.channels_last)
                setattr(unet, _CHANNELS_LAST_MARK, True)
            for module in repeated_blocks(unet) if regional else [unet]:
                module.compile(**options)
                compiled += 1
        _raise_recompile_limits(compiled)
        if warmup is not None:
            try:
                self(**warmup)
            except BaseException:
                self.disable_compile()
                raise

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        # identical to DiffusionPipeline's except: refused over whole-UNet compilation, whose graph cannot trace the
        # hook (regional compilation leaves it outside the compiled blocks).
        if whole := self._whole_compiled_unets():
            raise ValueError(
                f"enable_model_cpu_offload() after enable_compile(regional=False) ({', '.join(whole)} compiled "
                "whole): the graph cannot trace the offload hook; call disable_compile(), then "
                "enable_compile(regional=True) after the offload"
            )
        super().enable_model_cpu_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> None:
        # identical to DiffusionPipeline's except: refused over compiled UNets (per-layer hooks in every block).
        if self.is_compiled:
            raise ValueError(
                "enable_sequential_cpu_offload() after enable_compile(): its per-layer hooks move weights inside "
                "every compiled block; call disable_compile() first, or use enable_model_cpu_offload()"
            )
        super().enable_sequential_cpu_offload(*args, **kwargs)

    def disable_compile(self) -> None:
        """Undo `enable_compile()` on every UNet of this pipeline (whichever pipeline compiled it): the eager modules,
        in the memory format they had. Compiled code stays in torch's caches until `torch._dynamo.reset()`."""
        for unet in self._compilable_unets().values():
            for module in _compiled_modules(unet):
                module._compiled_call_impl = None
            if getattr(unet, _CHANNELS_LAST_MARK, False):
                unet.to(memory_format=torch.contiguous_format)
                delattr(unet, _CHANNELS_LAST_MARK)
