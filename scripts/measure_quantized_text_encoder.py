"""Bytes and error of a quantized T5 encoder: the tests' tiny T5, and T5-v1.1-XXL's width extrapolated to its depth.

For each method (`int8`: torchao's int8 weight-only; `nf4`: bitsandbytes' 4-bit NormalFloat; `bnb-int8`:
bitsandbytes' LLM.int8(), Python API only; those whose package is installed), loads the encoder as our pipelines do
(transformers' `from_pretrained` with the config `if_diffusers.quantization.text_encoder_quantization` builds) and
prints:

- bytes: `weight_bytes` of the encoder loaded as beside float16 models (quantized: norms, embedding and the layers
  transformers keeps out in float16 or float32), against every weight in 2 bytes; for XXL, the built layers' model
  plus (24 - built) x its last layer (layer 0 alone carries the relative-position bias), with the full 32128 x 4096
  embedding: 4.76B parameters, 9.52 GB in 2 bytes. `float16` is transformers' float16 load, which keeps T5's `wo`
  layers in float32; `linears quantized` counts one layer's;
- error: ||E_q - E||_F / ||E||_F of `last_hidden_state` for 2 x 77 random tokens, E the same stored float16 weights
  computed in float32, the quantized encoder computed in float32 too (the quantization alone); after each layer as
  well; `float16` and `bfloat16` in their dtype, weights and compute, for comparison. For XXL, the error at 24 layers
  if the layers' errors add as independent ones (sqrt(layers): over 1-4 built layers they did).

Random weights (transformers' T5 initialisation, seed 0): the figures measure the quantization step at this width,
not trained T5's activations, whose outlier features LLM.int8() exists for.

    python scripts/measure_quantized_text_encoder.py                 # tiny T5 and 2 XXL-width layers (3 min)
    python scripts/measure_quantized_text_encoder.py --xxl-layers 4  # README's figures (CPU: 3-6 min, 6 GB)
    python scripts/measure_quantized_text_encoder.py --xxl-layers 0  # the tiny T5 only (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import tempfile
from pathlib import Path

import torch
import transformers  # its models are imported lazily: after if_diffusers, which imports torchao quietly

from if_diffusers.quantization import text_encoder_quantization, weight_bytes

TINY = dict(vocab_size=64, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3)  # tests/conftest.py's T5
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_heads=64)  # T5-v1.1-XXL, 24 layers
XXL_LAYERS = 24
TOKENS = (2, 77)  # a prompt and its negative, IF's sequence length
PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes", "bnb-int8": "bitsandbytes"}


def t5_config(**fields) -> transformers.T5Config:
    """A T5 v1.1 encoder config (gated GELU feed-forward, as IF's T5)."""
    return transformers.T5Config(**fields, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def quantization_config(method: str):
    """transformers' config for `method`: our CLI's (`int8`, `nf4`), or LLM.int8() for `bnb-int8`."""
    if method == "bnb-int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return text_encoder_quantization(method, "cpu", torch.float32).quant_mapping["text_encoder"]


def load(folder: Path, dtype: torch.dtype, method: str | None = None) -> transformers.T5EncoderModel:
    quantization = {} if method is None else {"quantization_config": quantization_config(method)}
    return transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype, **quantization).eval()


@torch.no_grad()
def hidden_states(model: transformers.T5EncoderModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output (before the final norm), then `last_hidden_state`, in float32."""
    output = model(ids, output_hidden_states=True)
    return [h.float() for h in output.hidden_states[1:-1]] + [output.last_hidden_state.float()]


def relative_errors(states: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    return [float((s - r).norm() / r.norm()) for s, r in zip(states, reference)]


def measure(name: str, config: transformers.T5Config, methods: list[str], full_layers: int) -> dict:
    """Bytes (extrapolated to `full_layers`) and errors of each variant of a random-weight T5 of `config`."""
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, TOKENS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stored = transformers.T5EncoderModel(config).eval().to(torch.float16)  # as IF's T5 is stored

        def extrapolated(model: transformers.T5EncoderModel, count) -> int:
            return count(model) + (full_layers - config.num_layers) * count(model.encoder.block[-1])

        half_bytes = 2 * extrapolated(stored, lambda m: sum(p.numel() for p in m.parameters()))
        stored.save_pretrained(tmp)
        del stored
        reference = hidden_states(load(tmp, torch.float32), ids)
        for variant in ["float16", "bfloat16", *methods]:
            quantized = variant not in ("float16", "bfloat16")
            model = load(tmp, torch.float32 if quantized else getattr(torch, variant), variant if quantized else None)
            errors = relative_errors(hidden_states(model, ids), reference)
            if quantized:  # bytes as loaded beside float16 models: norms, embedding and unquantized layers in float16
                del model
                model = load(tmp, torch.float16, variant)
            linears = [m for m in model.encoder.block[-1].modules() if isinstance(m, torch.nn.Linear)]
            plain = sum(type(m) is torch.nn.Linear and type(m.weight) is torch.nn.Parameter for m in linears)
            nbytes = extrapolated(model, weight_bytes)
            results[variant] = {"bytes": nbytes, "of_float16": nbytes / half_bytes, "error": errors[-1],
                                "layers": errors[:-1], "quantized_linears": f"{len(linears) - plain}/{len(linears)}",
                                "error_full_depth": errors[-1] * math.sqrt(full_layers / config.num_layers)}  # fmt: skip
            del model
    return {"model": name, "layers": full_layers, "float16_bytes": half_bytes, "methods": results}


def size(nbytes: int) -> str:
    return next(f"{nbytes / 10**p:.4g} {unit}" for p, unit in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B"))
                if nbytes >= 10**p or p == 0)  # fmt: skip


def report(result: dict) -> str:
    deeper = result["layers"] > len(next(iter(result["methods"].values()))["layers"]) + 1
    lines = [f"{result['model']}, {result['layers']} layers: every weight in 2 bytes {size(result['float16_bytes'])}",
             "| variant | bytes | of 2 bytes a weight | linears quantized (a layer) | rel. error | after layers 1.. |"
             + (f" if errors add as sqrt(layers), at {result['layers']} |" if deeper else ""),
             "|---|---|---|---|---|---|" + ("---|" if deeper else "")]  # fmt: skip
    for variant, r in result["methods"].items():
        layers = ", ".join(f"{e:.2e}" for e in r["layers"])
        lines.append(f"| {variant} | {size(r['bytes'])} | {r['of_float16']:.3f} | {r['quantized_linears']} | "
                     f"{r['error']:.2e} | {layers} |" + (f" {r['error_full_depth']:.1e} |" if deeper else ""))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xxl-layers", type=int, default=2, help="XXL-width layers to build (0: skip XXL)")
    parser.add_argument("--methods", nargs="+", choices=list(PACKAGES), help="default: those installed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    methods = args.methods or [m for m, package in PACKAGES.items() if importlib.util.find_spec(package)]
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # LLM.int8() notes each float32 cast to float16
    torch.set_grad_enabled(False)
    results = [measure("tiny T5 (tests)", t5_config(**TINY), methods, TINY["num_layers"])]
    if args.xxl_layers:
        config = t5_config(**XXL, num_layers=args.xxl_layers)
        results.append(measure(f"T5-XXL width, {args.xxl_layers} layers built", config, methods, XXL_LAYERS))
    for result in results:
        print(report(result), end="\n\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
