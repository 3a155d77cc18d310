"""`diffaccel app`: help, and bad arguments exit with code 2 before anything is served."""

import pytest
from diffaccel.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["app", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "--model" in out


@pytest.mark.parametrize("argv, needle", [
    (["app", "--port", "0"], "--port must be in 1..65535"),
    (["app", "--max-models", "0"], "--max-models must be >= 1"),
    (["app", "--model", "digits-features"], "not a pipeline"),
])
def test_bad_arguments_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err
