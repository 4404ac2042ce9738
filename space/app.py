"""The if-diffusers app as a Hugging Face Space (Gradio SDK): the same app as `if-diffusers serve`.

With no variables set it serves the demo cascade bundled in the package, on the CPU. To serve DeepFloyd IF, set the
Space's variables IF_MODEL=DeepFloyd/IF-I-XL-v1.0, IF_STAGE_2=DeepFloyd/IF-II-L-v1.0 and, optionally,
IF_STAGE_3=stabilityai/stable-diffusion-x4-upscaler, and a secret HF_TOKEN of an account that accepted DeepFloyd's
licence on each model's page. GPU memory decides the offload; on ZeroGPU (the `spaces` package) jobs take the GPU.
"""

import contextlib
import os
import sys

with contextlib.suppress(ImportError):  # ZeroGPU: `spaces` must come before torch touches CUDA
    import spaces  # noqa: F401

from if_diffusers.app import main  # noqa: E402


def arguments(environ=os.environ) -> list[str]:
    """`if-diffusers serve` options from the Space's variables (Spaces set GRADIO_SERVER_NAME and _PORT)."""
    options = [
        "--host",
        environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        "--port",
        environ.get("GRADIO_SERVER_PORT", "7860"),
    ]
    for option, variable in (("--model", "IF_MODEL"), ("--stage-2", "IF_STAGE_2"), ("--stage-3", "IF_STAGE_3")):
        if environ.get(variable):
            options += [option, environ[variable]]
    return options


if __name__ == "__main__":
    sys.exit(main(arguments()))
