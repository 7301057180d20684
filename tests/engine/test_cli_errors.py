"""Issue 10 at the command line: every bad flag value and every dangerous output path is refused with exit
code 2 and a message naming the flag and the fix, before any model is loaded; no input is ever destroyed."""

from __future__ import annotations

import pytest
from report_cases import accel_argv, prune_argv

from adapt_engine import accel, bench, commands
from adapt_engine.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was rejected")

    for module in (commands, accel, bench):
        monkeypatch.setattr(module, "load_model", refuse)


def _rejected(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adapt-engine {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    argv = ["--target-params" if a == "--sparsity" and flag == "--target-params" else a for a in argv]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "bogus", "meta"])
@pytest.mark.parametrize("command", ["prune", "eval", "accel"])
def test_bad_device_is_a_usage_error(tmp_path, tiny_model_dir, capsys, no_loading, command, device):
    argv = {"prune": prune_argv(tiny_model_dir, tmp_path / "o"), "accel": accel_argv(tiny_model_dir, tmp_path / "o"),
            "eval": ["eval", "--model", str(tiny_model_dir)]}[command]
    _rejected(argv + ["--device", device], capsys, "--device", "cpu")


@pytest.mark.parametrize("command,flag,value,needle", [
    ("prune", "--sparsity", "1.5", "--sparsity must be in [0, 1)"),
    ("prune", "--sparsity", "-0.1", "--sparsity must be in [0, 1)"),
    ("prune", "--eval-tokens", "-5", "--eval-tokens must be at least 0"),
    ("prune", "--steps", "0", "--steps must be at least 1"),
    ("prune", "--calib-samples", "0", "--calib-samples must be at least 1"),
    ("prune", "--amplitude", "2", "--amplitude must be in [0, 1]"),
    ("prune", "--dtype", "int8", "--dtype must be one of"),
    ("prune", "--target-params", "0", "--target-params must be at least 1"),
    ("accel", "--threads", "-2", "--threads must be at least 1"),
    ("accel", "--val-tokens", "-1", "--val-tokens must be at least 0"),
    ("accel", "--micro-batch", "0", "--micro-batch must be at least 1"),
    ("accel", "--lr", "0", "--lr must be greater than 0"),
    ("accel", "--min-lr", "1", "--min-lr 1.0 is above --lr"),
    ("accel", "--sparsity", "1", "--sparsity must be in [0, 1)"),
])
def test_bad_values_are_rejected_before_loading(tmp_path, tiny_model_dir, capsys, no_loading, command, flag, value,
                                                needle):
    argv = (prune_argv if command == "prune" else accel_argv)(tiny_model_dir, tmp_path / "o")
    _rejected(_with(argv, flag, value), capsys, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--max-tokens", "-3", "--max-tokens must be at least 1"),
    ("--seq-len", "1", "--seq-len must be at least 2"),
])
def test_eval_bad_values(tiny_model_dir, capsys, no_loading, flag, value, needle):
    _rejected(["eval", "--model", str(tiny_model_dir), flag, value], capsys, needle)


@pytest.mark.parametrize("command", ["prune", "accel"])
def test_output_that_cannot_be_written_is_refused_before_loading(tmp_path, tiny_model_dir, capsys, no_loading,
                                                                 command):
    argv = prune_argv if command == "prune" else accel_argv
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _rejected(argv(tiny_model_dir, a_file), capsys, "is an existing file")
    _rejected(argv(tiny_model_dir, a_file / "below"), capsys, "is a file")
    _rejected(argv(tiny_model_dir, "/sys/adapt-engine-out"), capsys, "cannot be written")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("command", ["prune", "accel"])
def test_output_equal_to_or_containing_the_model_is_refused(tmp_path, tiny_model_dir, capsys, no_loading, command):
    argv = prune_argv if command == "prune" else accel_argv
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    _rejected(argv(tiny_model_dir, tiny_model_dir) + ["--overwrite"], capsys, "an input of this command")
    _rejected(argv(tiny_model_dir, tiny_model_dir.parent) + ["--overwrite"], capsys, "an input of this command")
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == files


def test_overwrite_of_the_current_folder_is_refused(tmp_path, tiny_model_dir, capsys, no_loading, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    _rejected(prune_argv(tiny_model_dir, ".") + ["--overwrite"], capsys, "--output")
    assert (work / "notes.txt").read_text() == "mine"


def test_accel_checkpoint_dir_of_user_files_is_refused_and_kept(tmp_path, tiny_model_dir, capsys, no_loading,
                                                               monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    argv = [a for a in accel_argv(tiny_model_dir, tmp_path / "out") if a != "--no-checkpoints"]
    _rejected(argv + ["--checkpoint-dir", str(home)], capsys, "not created by adapt-engine")
    monkeypatch.chdir(home)
    _rejected(argv + ["--checkpoint-dir", "."], capsys, "not created by adapt-engine")
    _rejected(argv + ["--checkpoint-dir", ".", "--overwrite"], capsys, "not created by adapt-engine")
    assert (home / "thesis.tex").read_text() == "years of work"


def test_accel_checkpoint_dir_inside_output_or_model_is_refused(tmp_path, tiny_model_dir, capsys, no_loading):
    argv = [a for a in accel_argv(tiny_model_dir, tmp_path / "out") if a != "--no-checkpoints"]
    _rejected(argv + ["--checkpoint-dir", str(tmp_path / "out" / "ckpt")], capsys, "overlap")
    _rejected(argv + ["--checkpoint-dir", str(tiny_model_dir)], capsys, "--model")


def test_bench_output_under_a_file_is_refused_before_loading(tmp_path, capsys, no_loading):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["bench", "--compare", "p", "--device", "cpu", "--output", str(a_file / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_bench_bad_device_and_dtype(capsys, no_loading):
    assert main(["bench", "--compare", "p", "--device", "cuda:0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--compare", "p", "--device", "cpu", "--dtype", "int4"]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err


def test_leftovers_of_a_killed_save_are_removed_before_the_next_run(tmp_path, tiny_model_dir, no_loading):
    out = tmp_path / "pruned"
    dead = tmp_path / ".pruned.tmp-999999999-abc"  # the pid of no living process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    with pytest.raises(AssertionError, match="a model was loaded"):  # passed every check, then tried to load
        main(prune_argv(tiny_model_dir, out))
    assert not dead.exists()
