"""The optional packages of the tools (``pip install seq2seq_fast[tools]``: matplotlib, sacrebleu,
tqdm): each is imported where it is used, and its absence costs a one-line note, not a crash."""
import importlib
import sys


def optional_import(name, without):
    """Module ``name`` (e.g. ``"tqdm.auto"``), or None after a note on stderr naming its package
    and saying what happens ``without`` it.

    >>> tqdm = optional_import("tqdm.auto", "progress is printed every 50 steps instead of a bar")
    note: tqdm is not installed, so progress is printed every 50 steps instead of a bar (pip install tqdm)
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        package = name.split(".")[0]
        print(f"note: {package} is not installed, so {without} (pip install {package})", file=sys.stderr)
        return None
