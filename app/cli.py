"""`diffaccel app`: launch the Gradio demo (baseline vs accelerated, side by side) on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import InputError
from ..core.options import int_in


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app", help="launch the Gradio demo: baseline vs accelerated, side by side",
        description="Serve the demo on HOST:PORT (127.0.0.1 by default: only this machine can reach it). It runs "
                    "offline on the bundled zoo, or on a local diffusers pipeline folder typed into the model picker.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only). On any other address, "
                        "visitors may open zoo pipelines and, with --models-dir, pipeline folders under it; nothing "
                        "else on disk")
    p.add_argument("--port", type=int_in(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder of saved pipelines that visitors may open by their path inside it (the only local "
                        "folders a non-loopback server accepts)")
    p.add_argument("--max-queue", type=int_in(1, 1000), default=16,
                   help="requests waiting at most (more are refused with 'queue full'; default 16); one runs at "
                        "a time")
    p.add_argument("--model", default="digits-sd",
                   help="model selected when the page opens: a zoo pipeline or a local pipeline folder "
                        "(default digits-sd)")
    p.add_argument("--max-models", type=int_in(1, 64), default=3,
                   help="pipelines kept loaded (least recently used dropped)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> int:
    from .access import LocalAccess

    access = LocalAccess.for_host(args.host, args.models_dir)  # checks --models-dir before anything loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise InputError("the demo needs gradio: install the app extra (pip install 'diffaccel[app]')") from exc
    from .runner import DemoRunner, RunInputError, RunRequest
    from .ui import build_app, launch

    runner = DemoRunner(max_models=args.max_models, access=access)
    print(f"loading {args.model} ...", file=sys.stderr)
    try:
        runner.models.get(args.model)  # fail early on a bad --model (and have it warm when the page opens)
    except RunInputError as exc:
        raise InputError(f"--model: {exc}") from exc
    demo = build_app(defaults=RunRequest(model=args.model), runner=runner, max_queue=args.max_queue)
    print(f"diffaccel app: serving on http://{args.host}:{args.port} (Ctrl+C to stop); models: "
          f"zoo pipelines and {access.describe()}", file=sys.stderr)
    launch(demo, host=args.host, port=args.port)
    return 0
