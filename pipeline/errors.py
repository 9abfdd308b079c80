"""The kinds of fatal failure, the exit codes the CLI maps them to, and notices that are not."""

import signal
import sys


def notice(text: str) -> None:
    """Something a person reading the job's log should know; the run carries on."""
    print(f"label-images: {text}", file=sys.stderr, flush=True)


class ImageError(Exception):
    """This item cannot be labelled; the message becomes the row's `error` text."""


class UsageError(Exception):
    """Bad usage, configuration or input, found before any image is labelled: exit 2."""

    exit_code = 2


class RunError(Exception):
    """A fatal failure while running (disk, workers, lock): exit 1, committed shards intact."""

    exit_code = 1


class ProcessFailure(RunError):
    """A process of the run died of something of its own (a signal from outside, the OOM
    killer), not of the data and not of the job: doing the same work again may succeed."""


class Interrupted(Exception):
    """Stopped by a signal (exit 128 + signal number); every shard committed so far is intact."""

    def __init__(self, signum: int, committed: int, total: int):
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: {committed} of {total} shards committed; "
                         "run the same command again to resume")
