"""Run `diffaccel` in-process and capture what a user sees: exit code, stdout, stderr."""

from __future__ import annotations

import contextlib
import io

from diffaccel.cli import main


def run_cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``diffaccel ARGV`` (usage errors exit through SystemExit; caught here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def last_line(text: str) -> str:
    """The last non-empty line (progress bars and warnings may come before an error)."""
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
