"""The Gradio app over `IFCascadePipeline`: `if-diffusers serve`, and the Hugging Face Space in `space/`.

    app = build_app(jobs)          # gradio.Blocks over loaded models (`CascadeJobs`)
    main(["--model", "DeepFloyd/IF-I-XL-v1.0", "--stage-2", "DeepFloyd/IF-II-L-v1.0"])   # load, then serve

Gradio is the `[app]` extra; this module imports it only when the app is built.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TYPE_CHECKING

import torch

from .. import generation_options as options
from .jobs import CascadeJobs

if TYPE_CHECKING:
    import gradio

DESCRIPTION = "serve the cascade as a web app (Gradio): candidates, upscaling, image to image, inpainting"
INSTALL_HINT = 'the app needs gradio: pip install "if-diffusers[app]"'
HEADROOM = 3 * 2**30  # bytes of GPU memory kept for activations (stage III at 1024x1024) when choosing offload


def build_app(jobs: CascadeJobs, queue_size: int = 8, concurrency: int = 1) -> gradio.Blocks:
    """The page over loaded models; ImportError naming the install command without gradio."""
    try:
        from .ui import build_app as build
    except ImportError as error:
        if error.name not in ("gradio", "gradio_client"):
            raise
        raise ImportError(INSTALL_HINT) from None
    return build(jobs, queue_size, concurrency)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_model_arguments(parser, offload_default="auto")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--queue-size", type=int, default=8, help="requests that may wait (more are refused)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1: one GPU job)")


def choose_offload(model_bytes: int, largest_model_bytes: int, free_bytes: int | None) -> str:
    """ "none" when every model fits the free accelerator memory with `HEADROOM` to spare, else "model" (one model
    on it at a time) when the largest fits, else "sequential"; "none" without an accelerator (`free_bytes` None)."""
    if free_bytes is None or model_bytes + HEADROOM <= free_bytes:
        return "none"
    return "model" if largest_model_bytes + HEADROOM <= free_bytes else "sequential"


def load_jobs(args: argparse.Namespace) -> CascadeJobs:
    """The models the options name, loaded once, on the device or offloaded (`--offload auto`: `choose_offload`)."""
    offload = args.offload
    args.offload = "none" if offload == "auto" else offload
    device, dtype = options.resolve_device(args.device, args.dtype, args.offload)
    if offload != "auto":
        pipeline = options.load_cascade(args, dtype, device, [])
    else:
        pipeline = options.load_cascade(args, dtype, torch.device("cpu"), [])
        sizes = [sum(p.numel() * p.element_size() for p in m.parameters())
                 for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]  # fmt: skip
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        args.offload = choose_offload(sum(sizes), max(sizes), free)
        options.place(pipeline, args.offload, device)
    return CascadeJobs(pipeline, options.model_ids(args), device)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: expected 0 to 65535 (0: any free port)")
    for option, value in (("--queue-size", args.queue_size), ("--concurrency", args.concurrency)):
        if value < 1:
            parser.error(f"{option} {value}: expected an int >= 1")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`if-diffusers serve`: check, load the models once, serve until interrupted; 1 with one line on error."""
    check_arguments(parser, args)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        jobs = load_jobs(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    port = args.port or free_port(args.host)
    print(f"serving {jobs.models['model']} (offload: {args.offload}) on http://{args.host}:{port}")
    app = build_app(jobs, args.queue_size, args.concurrency)
    app.launch(server_name=args.host, server_port=port, share=args.share, show_error=False)
    return 0


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="if-diffusers serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser, parser.parse_args(argv))


__all__ = ["CascadeJobs", "build_app", "choose_offload", "main"]
