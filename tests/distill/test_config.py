"""The run's frozen config and the stage -> objective table (no model is loaded)."""

import dataclasses

import pytest
from diffaccel.distill.config import STAGES, DistillConfig, DistillInputError
from diffaccel.distill.stages import STAGE_TABLE
from diffaccel.distill.train import build_parser, parse_args


def test_config_is_frozen_parsed_checked_and_aliases_resolved(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = parse_args(["--stage", "distill", "--student_init", "x", "--pairs_dir", "p", "--output_dir", "o",
                      "--validation_prompts", "a", "b"])
    assert isinstance(cfg, DistillConfig) and cfg.stage == "one-step" and cfg.local_rank == 1
    assert cfg.validation_prompts == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0
    # every flag is a field and every field but local_rank is a flag, with the parser's default
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests | {"local_rank"} == {f.name for f in dataclasses.fields(DistillConfig)}
    assert cfg.learning_rate == build_parser().get_default("learning_rate") == 1e-4
    scalars = cfg.scalars()
    assert scalars["stage"] == "one-step" and "validation_prompts" not in scalars and scalars["student_init"] == "x"
    with pytest.raises(DistillInputError, match="needs --student_init"):
        dataclasses.replace(cfg, student_init=None).check()


def test_stage_table_covers_every_stage():
    assert tuple(STAGE_TABLE) == STAGES
    assert STAGE_TABLE["pairs"].loss is None  # pairs write couplings; every other stage optimises something
    assert all(STAGE_TABLE[s].loss is not None for s in STAGES if s != "pairs")
    assert STAGE_TABLE["guidance"].trainable is not STAGE_TABLE["reflow"].trainable  # LoRA only vs everything
    cfg = parse_args(["--stage", "one-step", "--student_init", "x", "--pairs_dir", "p", "--output_dir", "o",
                      "--distill_k", "2"])
    assert STAGE_TABLE["one-step"].sample_steps(cfg) == 2 and STAGE_TABLE["reflow"].sample_steps(cfg) == 25
