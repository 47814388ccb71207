"""The example scripts' command lines: --help and usage errors answer before TensorFlow
loads, and an --out that cannot be written fails before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

import wlcnn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: The scripts that import wlcnn, directly or through skies (and so TensorFlow).
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "skies.py"
                 and any(f"{w} {m}" in p.read_text()
                         for w in ("import", "from") for m in ("wlcnn", "skies")))

#: Runs a script as __main__ with the given arguments, then reports on stdout whether
#: TensorFlow was imported; the script's exit status is the wrapper's.
RUN = """
import runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script] + args
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
print("TENSORFLOW" if "tensorflow" in sys.modules else "NO-TENSORFLOW")
sys.exit(code)
"""


def run_script(name, *args, cwd=None):
    return subprocess.run([sys.executable, "-c", RUN, str(EXAMPLES / name), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_every_script_that_imports_wlcnn_is_covered():
    assert {"reconstruct_catalog.py", "simulate_skies.py", "train.py", "cosmos.py",
            "wide_field.py", "evaluate_table2.py", "bench_gridding.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_answers_without_tensorflow(name):
    res = run_script(name, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout and "--verbose" in res.stdout
    assert res.stdout.rstrip().endswith("NO-TENSORFLOW"), res.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_option_is_a_usage_error_without_tensorflow(name):
    res = run_script(name, "--no-such-option")
    assert res.returncode == 2
    # argparse names the first problem: the unknown option, or a required one missing.
    assert res.stderr.splitlines()[-1].startswith(f"{name}: error: ")
    assert res.stdout.rstrip().endswith("NO-TENSORFLOW")


def test_output_file_in_a_missing_directory_fails_before_the_work(tmp_path):
    missing = tmp_path / "nodir"
    res = run_script("reconstruct_catalog.py", tmp_path / "catalog.fits", "--models",
                     tmp_path / "models", "--out", missing / "k.fits", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"reconstruct_catalog.py: error: argument --out: directory {missing} does not exist")
    assert res.stdout.rstrip().endswith("NO-TENSORFLOW")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary


def test_output_directory_through_a_file_fails_before_the_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = run_script("simulate_skies.py", "--out", blocker / "dataset", "--n-train", "1",
                     "--n-val", "1", "--n-test", "1", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"simulate_skies.py: error: argument --out: {blocker} is not a directory")
    assert res.stdout.rstrip().endswith("NO-TENSORFLOW")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_output_directory_is_made_with_its_parents(tmp_path, capsys):
    import train
    out = tmp_path / "new" / "runs"
    args = train.build_parser().parse_args(["--data", str(tmp_path), "--out", str(out)])
    assert args.out == str(out) and not out.exists()  # checked, not yet made
    with pytest.raises(SystemExit) as exc:
        train.build_parser().parse_args(["--data", str(tmp_path),
                                         "--out", str(tmp_path / "x" / "y"),
                                         "--preset", "nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_train_command_line_choices_match_its_presets_and_wlcnns_variants():
    import train
    assert train.PRESET_NAMES == tuple(sorted(train.PRESETS))
    assert train.VARIANT_NAMES == tuple(wlcnn.VARIANTS)
