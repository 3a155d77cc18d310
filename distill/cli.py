"""`diffaccel distill pairs|reflow|one-step|guidance ...`: the stages of `python -m diffaccel.distill.train`.

Every flag of the training script is available under each stage (`diffaccel distill reflow --help`). Exit codes:
0 ok, 2 bad input (missing teacher, wrong resume folder, invalid values: nothing is overwritten), 3 missing or
corrupt zoo weights.
"""

from __future__ import annotations

import argparse

STAGE_HELP = {
    "pairs": "write teacher couplings (z0, z1, prompt) as atomic shards with a manifest (resumable)",
    "reflow": "train a rectified flow (2-RF) on the couplings, initialised from the teacher",
    "one-step": "distil a reflowed model into a one-step student",
    "guidance": "LoRA guidance distillation: one conditional pass gives the CFG output",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from .train import build_parser

    p = subparsers.add_parser("distill", help="reflow and one-step distillation (InstaFlow-style)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="distill_stage", required=True, metavar="STAGE")
    for stage, help_ in STAGE_HELP.items():
        sp = stages.add_parser(stage, help=help_, description=help_)
        build_parser(sp)
        sp.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:

    from .train import main, normalize_args

    args.stage = args.distill_stage
    main(normalize_args(args))
    return 0
