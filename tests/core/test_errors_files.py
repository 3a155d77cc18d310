"""core/errors.py (one hierarchy, one exit-code mapping) and core/files.py (atomic writes, output checks, sha256)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from diffaccel.cli import main
from diffaccel.core.errors import DiffaccelError, InputError, WeightsError, run_command
from diffaccel.core.files import (
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    check_new_files,
    check_output_path,
    publish,
    sha256_file,
)


def test_hierarchy_and_exit_codes():
    assert issubclass(InputError, DiffaccelError) and issubclass(InputError, ValueError)
    assert issubclass(WeightsError, DiffaccelError) and issubclass(WeightsError, RuntimeError)
    assert (DiffaccelError().exit_code, InputError().exit_code, WeightsError().exit_code) == (1, 2, 3)
    assert DiffaccelError("x", exit_code=5).exit_code == 5
    from diffaccel.distill.pairs import PairsError
    from diffaccel.evals.errors import EvalInputError, FeatureExtractorWeightsNotFound
    from diffaccel.parallel.config import CommunicationError, PatchParallelError
    from diffaccel.zoo import ZooError

    assert issubclass(EvalInputError, InputError) and issubclass(PairsError, InputError)
    assert issubclass(PatchParallelError, InputError) and issubclass(FeatureExtractorWeightsNotFound, WeightsError)
    assert issubclass(ZooError, WeightsError) and CommunicationError("rank 1").exit_code == 1


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc,code", [(InputError("bad --steps"), 2), (WeightsError("broken"), 3),
                                      (DiffaccelError("rank 1 died"), 1), (RuntimeError("bug"), 1),
                                      (ValueError("bad value from a library"), 2)])
def test_run_command_prints_one_line_and_the_exit_code(exc, code, capsys):
    assert run_command(_raise(exc)) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert run_command(lambda: 0) == 0 and run_command(lambda: None) == 0


def test_debug_shows_the_traceback(capsys):
    assert run_command(_raise(InputError("bad")), debug=True) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_maps_errors_in_one_place(capsys):
    assert main(["zoo", "sample", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: unknown zoo model 'no-such-model'") and err.count("\n") == 1
    assert main(["--debug", "zoo", "sample", "no-such-model"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_usage_errors_are_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "diffaccel", "zoo", "sample", "digits-dit", "--steps", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--steps" in r.stderr and "Traceback" not in r.stderr


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(f, b"one")
    assert f.read_bytes() == b"one"
    atomic_write_text(f, "two")
    assert f.read_text() == "two"

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(f, broken)
    assert f.read_text() == "two" and sorted(p.name for p in f.parent.iterdir()) == ["a.bin"]  # no temporary left


def test_atomic_folder_publish_replaces_the_whole_folder(tmp_path):
    d = tmp_path / "entry"
    atomic_save(d, lambda tmp: (tmp / "w.bin").write_bytes(b"v1"), directory=True)
    atomic_save(d, lambda tmp: (tmp / "x.bin").write_bytes(b"v2"), directory=True)
    assert sorted(p.name for p in d.iterdir()) == ["x.bin"] and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    src = tmp_path / "src.txt"
    src.write_text("s")
    publish(src, tmp_path / "dst.txt")
    assert (tmp_path / "dst.txt").read_text() == "s" and not src.exists()


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MiB read chunk
    f = tmp_path / "d"
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_check_output_path(tmp_path):
    existing = tmp_path / "x.npz"
    existing.write_text("keep")
    with pytest.raises(InputError, match="--save-stats .*already exists; pass --force"):
        check_output_path(existing, option="--save-stats")
    assert check_output_path(existing, force=True) == existing and existing.read_text() == "keep"
    with pytest.raises(InputError, match="--out: cannot create folder"):
        check_output_path(existing / "inside" / "y.npz", option="--out")  # a folder cannot be made under a file
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_path(existing, directory=True, option="--out")
    made = check_output_path(tmp_path / "new" / "deeper", directory=True)
    assert made.is_dir()
    with pytest.raises(InputError, match="--out: .*x.npz already exist"):
        check_new_files([existing, tmp_path / "free.png"])
    check_new_files([existing], force=True)
