"""Property tests: every numeric option of every subcommand, and the schedulers' constructors.

Invariant (issue 14): exit 0 with sane output, or exit 2 with a one-line message naming the option; never a
traceback, never exit 0 on an invalid value. Parsing is checked for every option; a few cheap commands also run
end to end on tiny random zoo models.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from clirun import last_line, run_cli
from diffaccel.cli import build_parser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RUNS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        else:
            yield path, parser, action


def _numeric_options():
    return [(path, parser, a) for path, parser, a in _walk(build_parser())
            if a.option_strings and a.type is not None and hasattr(a.type, "bounds")]


def test_no_numeric_option_is_left_unchecked():
    """Every int/float option goes through a range-checked type (core/options.py); none uses bare int/float."""
    bare = [(" ".join(path), a.option_strings[-1]) for path, _, a in _walk(build_parser())
            if a.option_strings and a.type in (int, float)]
    assert not bare, bare
    assert len(_numeric_options()) >= 60


def _required_args(parser: argparse.ArgumentParser, tested: argparse.Action) -> list[str]:
    """Placeholders for a subcommand's required positionals, options and option groups (only parsing is exercised).

    A required mutually exclusive group (e.g. ``cache calibrate``'s ``--speedup`` / ``--min-psnr``) gets one member
    with a value inside its range, unless the option under test belongs to the group.
    """
    out: list[str] = []
    for a in parser._actions:
        if not a.option_strings and a.nargs not in ("?", "*") and not isinstance(a, argparse._SubParsersAction):
            out.append(a.choices[0] if a.choices else "x")
        elif a.option_strings and a.required:
            out += [a.option_strings[-1], "x.safetensors"]
    for group in parser._mutually_exclusive_groups:
        if group.required and tested not in group._group_actions:
            member = group._group_actions[0]
            out += [member.option_strings[-1], _inside(member)]
    return out


def _inside(action: argparse.Action) -> str:
    """A value the action's range-checked type accepts."""
    bounds = getattr(action.type, "bounds", None)
    if bounds is None:
        return "x"
    return next(t for t in ("1", "2", "0.5", "10", "30", "1000") if _valid(bounds, action.type.__name__, t))


def _valid(bounds, kind: str, text: str) -> bool:
    lo, hi, lo_open, hi_open = bounds
    try:
        v = int(text) if kind == "integer" else float(text)
    except ValueError:
        return False
    if kind == "number" and not math.isfinite(v):
        return False
    if lo is not None and (v <= lo if lo_open else v < lo):
        return False
    return not (hi is not None and (v >= hi if hi_open else v > hi))


values = st.one_of(st.integers(-10**13, 10**13).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["", "abc", "1e3", "0x10", "-0", "2.5", "nan", "inf", "-inf", "1_000"]))


@pytest.mark.parametrize("case", _numeric_options(), ids=lambda c: " ".join(c[0]) + " " + c[2].option_strings[-1])
@FAST
@given(text=values)
def test_every_numeric_option_accepts_exactly_its_range(case, text):
    path, parser, action = case
    argv = [*path, *_required_args(parser, action), f"{action.option_strings[-1]}={text}"]
    code, out, err = _parse(argv)
    if _valid(action.type.bounds, action.type.__name__, text):
        assert code == 0, (argv, err)
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert any(o in err for o in action.option_strings), (argv, err)


def _parse(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
            return 0, out.getvalue(), err.getvalue()
        except SystemExit as exc:
            return int(exc.code or 0), out.getvalue(), err.getvalue()


small = st.integers(-3, 4)


@RUNS
@given(n=small, steps=small, batch=small, seed=st.sampled_from([-1, 0, 7, 2**63 - 1, 2**64]))
def test_zoo_sample_end_to_end(tmp_path_factory, n, steps, batch, seed):
    out_dir = tmp_path_factory.mktemp("s")
    code, out, err = run_cli("zoo", "sample", "random-ddpm", "-n", str(n), "--steps", str(steps), "--batch-size",
                             str(batch), "--seed", str(seed), "--out", str(out_dir), "--json")
    valid = {"--num-images": n >= 1, "--steps": steps >= 1, "--batch-size": batch >= 1, "--seed": 0 <= seed < 2**63}
    assert "Traceback" not in err
    if all(valid.values()):
        assert code == 0, err
        res = json.loads(out)
        assert len(res["files"]) == n == len(list(out_dir.glob("*.png")))
        assert res["nfe"] == steps * math.ceil(n / batch)
    else:
        bad = [k for k, ok in valid.items() if not ok]
        assert code == 2 and any(b in last_line(err) for b in bad), err
        assert not list(out_dir.iterdir())


@RUNS
@given(label=st.integers(-2, 12), guidance=st.sampled_from(["-1", "0", "1.5", "nan", "1e9"]))
def test_zoo_sample_labels_and_guidance_end_to_end(tmp_path_factory, label, guidance):
    out_dir = tmp_path_factory.mktemp("l")
    code, out, err = run_cli("zoo", "sample", "random-dit", "-n", "1", "--steps", "1", "--label", str(label),
                             "--guidance", guidance, "--out", str(out_dir), "--json")
    valid_guidance = guidance in ("0", "1.5")
    assert "Traceback" not in err
    if 0 <= label <= 9 and valid_guidance:
        assert code == 0, err
        assert len(json.loads(out)["files"]) == 1
    else:
        assert code == 2 and ("--label" in last_line(err) or "--guidance" in last_line(err)), err


sched_ints = st.one_of(st.integers(-10**6, 10**6), st.sampled_from([0, 1, 2, 999, 1000, 1001]))


@FAST
@given(window=sched_ints, cutoff=sched_ints, shift=st.sampled_from([0, 1, 2, -1]),
       method=st.sampled_from(["ddim", "s-pndm", "f-pndm", "plms", None, "x", 3]),
       steps=st.integers(-2, 30))
def test_scheduler_constructors_refuse_or_sample(window, cutoff, shift, method, steps):
    import torch
    from diffaccel.samplers import PseudoNumericalScheduler, TimeShiftScheduler

    try:
        base = PseudoNumericalScheduler(method=method, alpha_index_shift=shift, timestep_spacing="pndm_uniform")
        ts = TimeShiftScheduler.wrap(base, window=window, cutoff=cutoff)
        ts.set_timesteps(steps)
    except ValueError as exc:  # InputError: the message names the argument
        assert type(exc).__name__ == "InputError"
        msg = str(exc)
        assert any(k in msg for k in ("method", "alpha_index_shift", "window", "cutoff", "num_inference_steps",
                                      "steps", "transitions")), msg
        assert not (method in ("ddim", "s-pndm", "f-pndm", "plms") and shift in (0, 1) and 0 <= window <= 1000
                    and 0 <= cutoff <= 1000 and steps >= 12), msg  # a valid setting must not be refused
        return
    assert method in ("ddim", "s-pndm", "f-pndm", "plms") and shift in (0, 1)
    assert 0 <= window <= 1000 and 0 <= cutoff <= 1000
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ts.timesteps:
        x = ts.step(0.9 * x, t, x).prev_sample
    assert torch.isfinite(x).all()
