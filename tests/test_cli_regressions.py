"""Issue 14, defects 1 and 9: invalid values that gave a traceback or silently ran something else."""

from __future__ import annotations

import pytest
from clirun import last_line, run_cli


@pytest.mark.parametrize("argv,option", [
    (["bench", "--steps", "0"], "--steps"),  # silently ran the suite's 50 steps
    (["demo", "-n", "0"], "--num-images"),  # traceback
    (["zoo", "quality", "digits-dit", "--batch-size", "-1"], "--batch-size"),
    (["fid", "a", "b", "--kid-subsets", "0"], "--kid-subsets"),
])
def test_invalid_values_exit_2_before_any_work(argv, option):
    code, out, err = run_cli(*argv)
    assert code == 2 and option in last_line(err) and "Traceback" not in err and out == ""


def test_plan_info_on_a_file_that_is_not_a_plan(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a plan")
    code, _, err = run_cli("cache", "plan-info", str(notes))
    assert code == 2 and "notes.txt is not a readable cache plan" in last_line(err) and "Traceback" not in err
    code, _, err = run_cli("cache", "plan-info", str(tmp_path))
    assert code == 2 and "is a folder" in last_line(err)
