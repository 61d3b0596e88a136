"""Progress bars (the data scan, the trainer, the evaluator) that suit where the output
goes: on a terminal tqdm's bar, redrawn in place; written to a file or a pipe (nohup, a CI
log, a TPU VM's job log), whole lines at most every `FILE_INTERVAL_S` seconds instead of
hundreds of carriage-return redraws."""
from __future__ import annotations

import sys

import tqdm

FILE_INTERVAL_S = 30.0


class _Lines:
    """A stream that writes each of tqdm's redraws as one line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text.strip():        # tqdm clears a finished bar with blanks: nothing to keep
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, **kwargs) -> tqdm.tqdm:
    """``tqdm.tqdm(iterable, **kwargs)`` on stderr (or ``file=``), in lines when that is
    not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), FILE_INTERVAL_S)
        kwargs.setdefault("delay", FILE_INTERVAL_S)   # short work leaves no line at all
        kwargs.setdefault("ncols", 100)
        stream = _Lines(stream)
    return tqdm.tqdm(iterable, file=stream, **kwargs)
