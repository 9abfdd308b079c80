"""What a review target is: a tool people confirm or correct labels in (Label Studio,
FiftyOne); the chosen rows go out with their predictions, people's answers come back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

REVIEW_BELOW = 0.5  # the review list: a top-1 score below this goes to people,
REVIEW_MARGIN = 0.1  # and so does one this close to the second label's

# What comes back from people, one row a reviewed image: joinable with the labels by key.
REVIEW_SCHEMA = pa.schema([
    pa.field("key", pa.string()),  # null where the tool knows only the path
    pa.field("label", pa.string()),  # the person's label
    pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
    pa.field("tool", pa.string()),
    pa.field("path", pa.string()),  # the image's path, where the tool knows no key
])


@dataclass(frozen=True)
class Run:
    """What an export says about the run its rows come from."""

    out: str
    model: str
    weights: str
    holds_files: bool  # each image a file of its own (not a tar member, a Parquet row)
    embeddings: bool = False  # the table has the images' embeddings

    @property
    def model_version(self) -> str:
        return f"{self.model} {self.weights}"


class ReviewTarget:
    """A review tool: one module each, one line in review/__init__.py's TARGETS."""

    name: str = ""
    takes_embeddings = False  # it keeps the run's embeddings (for similarity views)
    # what it declares for `export --option NAME=VALUE` (options.Option: typed, with help);
    # the export command's named flags (--file, --url, ...) are aliases of these
    options: tuple = ()

    def claims(self, where: str) -> bool:
        """Whether `where` holds this tool's answers."""
        return False

    def export(self, run: Run, rows: Iterable[pa.Table], labels: list[str],
               options: dict) -> dict:
        """Send the chosen rows (key, path, top1_label, top1_score, labels, scores, and the
        embedding where the run has it) to the tool; what was sent, where, as figures.
        `labels`: every label among the rows' top-k, sorted (the choices people get);
        `options`: those it declares that were given, typed."""
        raise NotImplementedError

    def reviews(self, where: str) -> Iterator[pa.Table]:
        """People's answers at `where` (a file the tool exported, a dataset's field), as
        tables of REVIEW_SCHEMA."""
        raise NotImplementedError
