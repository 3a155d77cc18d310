"""`diffaccel app`: launch the Gradio demo (baseline vs accelerated, side by side) on this machine."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app", help="launch the Gradio demo: baseline vs accelerated, side by side",
        description="Serve the demo on HOST:PORT (127.0.0.1 by default: only this machine can reach it). It runs "
                    "offline on the bundled zoo, or on a local diffusers pipeline folder typed into the model picker.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", default="digits-sd",
                   help="model selected when the page opens: a zoo pipeline or a local pipeline folder "
                        "(default digits-sd)")
    p.add_argument("--max-models", type=int, default=3, help="pipelines kept loaded (least recently used dropped)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_models < 1:
        raise ValueError(f"--max-models must be >= 1, got {args.max_models}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise ValueError("the demo needs gradio: install the app extra (pip install 'diffaccel[app]')") from exc
    from .runner import DemoRunner, RunInputError, RunRequest
    from .ui import build_app, launch

    runner = DemoRunner(max_models=args.max_models)
    print(f"loading {args.model} ...", file=sys.stderr)
    try:
        runner.models.get(args.model)  # fail early on a bad --model (and have it warm when the page opens)
    except RunInputError as exc:
        raise ValueError(f"--model: {exc}") from exc
    demo = build_app(defaults=RunRequest(model=args.model), runner=runner)
    print(f"diffaccel app: serving on http://{args.host}:{args.port} (Ctrl+C to stop)", file=sys.stderr)
    launch(demo, host=args.host, port=args.port)
    return 0
