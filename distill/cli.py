"""`diffaccel distill pairs|reflow|one-step|guidance ...`: the stages of `python -m diffaccel.distill.train`.

Every flag of the training script is available under each stage (`diffaccel distill reflow --help`). Exit codes:
0 ok, 2 bad input (missing teacher, wrong resume folder, invalid values: nothing is overwritten), 3 missing or
corrupt zoo weights.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from .stages import STAGE_TABLE
    from .train import build_parser

    p = subparsers.add_parser("distill", help="reflow and one-step distillation (InstaFlow-style)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="distill_stage", required=True, metavar="STAGE")
    for stage in STAGE_TABLE.values():
        sp = stages.add_parser(stage.name, help=stage.help, description=stage.help)
        build_parser(sp)
        sp.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .train import main, normalize_args

    args.stage = args.distill_stage
    main(normalize_args(args))
    return 0
