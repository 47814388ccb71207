"""cli: the command-line conventions of the example scripts, without TensorFlow.

Every script parses its command line before it imports :mod:`wlcnn` (and so
TensorFlow, ~6 s), so that ``--help`` and usage errors answer at once, and
checks where it will write before any work.  This module imports neither, which
is why these few helpers are not in ``skies.py``:

* an output *file* must go into an existing directory (:func:`output_file`);
* an output *directory* is made with its parents; what exists of its path must
  be a directory (:func:`output_dir`);
* TensorFlow's C++ log is quiet unless ``--verbose`` (:func:`quiet_tensorflow`).
"""
import argparse
import os


def output_file(text):
    """argparse ``type`` of an output file: its directory exists (checked at parse time)."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"directory {directory} does not exist")
    return text


def output_dir(text):
    """argparse ``type`` of an output directory, made later with its parents: what
    exists of its path must be a directory (not a file in the way)."""
    path = os.path.abspath(text)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is not a directory")
    return text


def quiet_tensorflow(verbose):
    """Quiet TensorFlow's C++ log (its CUDA probe's errors on a CPU machine) unless
    ``verbose``: ``TF_CPP_MIN_LOG_LEVEL`` works only if set before TensorFlow loads,
    and a value the user set wins.  Two ``I0000`` lines TensorFlow prints before its
    log is set up stay."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
