"""`diffaccel app`: help, and bad arguments exit with code 2 before anything is served."""

import pytest
from clirun import last_line, run_cli
from diffaccel.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["app", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "--model" in out


@pytest.mark.parametrize("argv, needle", [
    (["app", "--port", "0"], "argument --port: must be an integer in [1, 65535]"),
    (["app", "--max-models", "0"], "argument --max-models: must be an integer in [1, 64]"),
    (["app", "--model", "digits-features"], "not a pipeline"),
])
def test_bad_arguments_exit_2(argv, needle):
    code, _, err = run_cli(*argv)
    assert code == 2 and needle in last_line(err) and err.count("error:") == 1
