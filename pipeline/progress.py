"""Progress: a bar on a terminal, a plain line a minute in a log."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from pipeline.errors import notice
from pipeline.launchers import Slice
from pipeline.summary import count


# On a terminal the bar redraws in place. In a log (cron, a scheduler's capture) each redraw
# would stay, up to ten a second: tens of MB a night. There it is one plain line a minute
# (none for a job shorter than that: its summary line says it all).
LOG_PROGRESS_SECONDS = 60


class Bar(tqdm):
    """tqdm's bar, which also counts the error rows this invocation wrote ('3 errors')."""

    errors = 0

    def advance(self, images: int, errors: int = 0) -> None:
        if errors:  # said from the first one on, so a night going wrong shows early
            self.errors += errors
            self.set_postfix_str(count(self.errors, "error"), refresh=False)
        self.update(images)


def progress_bar(total: int, done: int, show: bool, part: Slice) -> Bar:
    """Items of this slice (all of them, unless an array job or torchrun split the work)."""
    which = None if part.whole else part.describe()
    if sys.stderr.isatty():
        return Bar(total=total, initial=done, unit="img", disable=not show, file=sys.stderr,
                    dynamic_ncols=True, smoothing=0.1, desc=which)
    prefix = f"label-images: {which}: " if which else "label-images: "
    return Bar(total=total, initial=done, unit="img", disable=not show,
                file=_LogLines(sys.stderr), mininterval=LOG_PROGRESS_SECONDS,
                maxinterval=LOG_PROGRESS_SECONDS, delay=LOG_PROGRESS_SECONDS, smoothing=0,
                bar_format=prefix + "{n} of {total} images ({percentage:.0f}%), {rate_fmt}{postfix}, "
                                    "{elapsed} elapsed, about {remaining} to go")


class _LogLines:
    """A stream for tqdm that keeps each of its redraws as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip()  # tqdm's carriage return, padding and final newline
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


# A step whose length is not known ahead (listing a source, comparing it with a table,
# writing the table) is said once it has taken this long, and then when it ends.
SAY_AFTER_SECONDS = 2.0


@contextmanager
def if_long(what: str, shown: bool = True):
    """A step that is quick on a small job and minutes on a large one: said only once it
    has taken SAY_AFTER_SECONDS, and then with its time when it ends."""
    said = threading.Event()
    began = time.perf_counter()

    def say() -> None:
        said.set()
        notice(f"{what} ...")

    if not shown:
        yield
        return
    timer = threading.Timer(SAY_AFTER_SECONDS, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a timer already saying its line finishes it first
        if said.is_set():
            notice(f"{what}: done in {time.perf_counter() - began:.1f} s")


@contextmanager
def step(what: str, shown: bool = True):
    """A start-up step that takes seconds (measuring, converting, compiling), said as it
    begins and with its time when it ends: a first minute is never a silent one."""
    if not shown:
        yield
        return
    notice(f"{what} ...")
    began = time.perf_counter()
    yield
    notice(f"{what}: done in {time.perf_counter() - began:.1f} s")
