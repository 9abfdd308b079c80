"""The commands people's answers go through: `export` the uncertain rows to a review tool,
read its `reviews` back, `fit` a new head on them and `relabel` a run with it. The CLI
registers them (pipeline/cli.py), each ending in one line on error like the others."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline import review
from pipeline.errors import UsageError
from pipeline.options import parse_flags
from pipeline.review.base import REVIEW_BELOW, REVIEW_MARGIN


def export(
    out: Annotated[str, typer.Argument(help="A finished run directory (path or URL).",
                                       metavar="OUT", show_default=False)],
    to: Annotated[str, typer.Option(
        "--to", help=f"The review tool: {' or '.join(review.TARGETS)}.", show_default=False)],
    rows: Annotated[str, typer.Option(
        help="review: the rows whose top-1 score is below --below or within --margin of the "
             "second, lowest first; spread: --limit of those (default 100) spread over the "
             "embedding space, what teaches a fit most (needs --embeddings); all: every ok "
             "row, in the table's order (default: review).", show_default=False)] = "review",
    where: Annotated[Optional[str], typer.Option(
        help="Only rows where this DuckDB condition holds, e.g. \"top1_score < 0.6\" or "
             "\"top1_label = 'tabby'\".")] = None,
    below: Annotated[float, typer.Option(
        help=f"--rows review: top-1 scores below this (default: {REVIEW_BELOW}).",
        show_default=False)] = REVIEW_BELOW,
    precision: Annotated[Optional[float], typer.Option(
        help="--rows review: instead of --below, the top-1 score at which the images people "
             "already reviewed are this precise (at least 20 answers): the labels above it "
             "are kept, the rest go to people.")] = None,
    margin: Annotated[float, typer.Option(
        help="--rows review: and those whose first two scores are closer than this "
             f"(default: {REVIEW_MARGIN}).", show_default=False)] = REVIEW_MARGIN,
    limit: Annotated[Optional[int], typer.Option(help="At most this many rows.")] = None,
    file: Annotated[Optional[Path], typer.Option(
        help="label-studio: write the tasks here (JSON) and the labelling config beside it "
             "(.xml), to import by hand.")] = None,
    url: Annotated[Optional[str], typer.Option(
        help="label-studio: import into the server at this URL through its API.")] = None,
    token: Annotated[Optional[str], typer.Option(
        help="label-studio: its API token (default: LABEL_STUDIO_API_KEY).")] = None,
    project: Annotated[Optional[int], typer.Option(
        help="label-studio: add to this project (tasks already there are skipped); default: "
             "a new project.")] = None,
    title: Annotated[Optional[str], typer.Option(help="label-studio: the new project's title.")] = None,
    local_files_root: Annotated[Optional[Path], typer.Option(
        help="label-studio: the folder it serves local files from (its "
             "LOCAL_FILES_DOCUMENT_ROOT); images must be below it.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="fiftyone: the dataset to create (default: label-images-<run name>).")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", metavar="NAME=VALUE",
        help="An option the review tool declares for itself (the flags above are its "
             "aliases); repeat for more. "
             + "; ".join(f"{name}: " + ", ".join(o.name for o in t.options)
                         for name, t in review.TARGETS.items() if t.options) + ".")] = None,
) -> None:
    """Send a finished run's rows to people: Label Studio tasks or a FiftyOne dataset."""
    from pipeline.options import declared
    from pipeline.review.selection import Selection, chosen, run_of

    target = review.get(to)
    given = parse_flags(option)
    takes = [o.name for o in target.options]
    for name in given:
        if name not in takes:
            raise UsageError(f"--option {name} is not for --to {to} (it takes "
                             f"{', '.join(takes) or 'none'})")
    aliases = {"file": file and str(file), "url": url, "token": token, "project": project,
               "title": title, "dataset": dataset,
               "local_files_root": local_files_root and str(local_files_root)}
    for name, value in aliases.items():
        if value is not None:
            if name not in takes:
                raise UsageError(f"--{name.replace('_', '-')} is not for --to {to}")
            given[name] = value
    options = declared(target, given)  # each of its type, or one line
    run = run_of(out)
    if precision is not None:
        from pipeline.review import calibration
        from pipeline.review.reviews import agreement

        found = calibration.figures(out, precision) if agreement(out) else None
        if found is None or found["threshold"] is None:
            raise UsageError(f"--precision {precision}: {out} needs at least "
                             f"{calibration.MIN_REVIEWED} reviews whose best-scored images "
                             "reach it; send a first review list with --below")
        below = found["threshold"]
        typer.echo(f"labels with top-1 >= {below:.3f} are {precision:.0%} precise on the "
                   f"{found['reviewed']} reviewed images and kept; those below go to people")
    picked = Selection(rows=rows, where=where, below=below, margin=margin, limit=limit)
    with chosen(out, picked, embeddings=target.takes_embeddings and run.embeddings) as (
            tables, count, labels):
        if not count:
            typer.echo(f"no rows of {out} match: nothing exported")
            return
        figures = target.export(run, tables, labels, options)
    where_to = figures.get("url") or figures.get("file") or figures.get("dataset")
    typer.echo(f"{figures.get('tasks', figures.get('samples'))} of {count} rows -> {to}: "
               f"{where_to}" + (f" ({figures['skipped']} already there)"
                                if figures.get("skipped") else ""))


def reviews(
    out: Annotated[str, typer.Argument(help="The run directory the reviewed rows came from.",
                                       metavar="OUT", show_default=False)],
    answers: Annotated[str, typer.Argument(
        help="Label Studio's JSON export of the project, or fiftyone://DATASET/FIELD.",
        metavar="ANSWERS", show_default=False)],
) -> None:
    """Read people's answers into OUT/reviews.parquet; say how often the model agreed."""
    from pipeline.report import agreement_line
    from pipeline.review.reviews import keep_agreement, record
    from pipeline.rundir import (REVIEWS_FILE, SUMMARY_FILE, RunDirectory, recorded, summary_of,
                                 write_json)

    target = review.reading(answers)
    with RunDirectory(out) as run_dir:
        kept = record(out, target.reviews(answers))
        figures = keep_agreement(out, "answers read", recorded(run_dir.store).labelled_with)
        summary = summary_of(run_dir.store)
        summary["reviews"] = figures
        write_json(run_dir.store, SUMMARY_FILE, summary)
    typer.echo(f"{kept} reviewed keys in {run_dir.store.url(REVIEWS_FILE)}")
    if figures:
        typer.echo(agreement_line(figures))


def fit(
    out: Annotated[str, typer.Argument(help="A finished run labelled with --embeddings.",
                                       metavar="OUT", show_default=False)],
    labels: Annotated[str, typer.Option(
        help="People's labels: reviews (OUT/reviews.parquet), folders (each image's folder "
             "names its class, the recipe's layout) or both (default: reviews).",
        show_default=False)] = "reviews",
    to: Annotated[Optional[Path], typer.Option(
        help="Where to write the checkpoint (default: OUT/fitted.pt).")] = None,
) -> None:
    """Train a new head on the run's embeddings with people's labels; check it on held-out
    answers; write a checkpoint --weights takes."""
    from pipeline import fit as fitting

    figures = fitting.fit(out, labels, str(to) if to else None)
    typer.echo("\n".join(fitting.lines(figures)))


def relabel(
    out: Annotated[str, typer.Argument(help="A finished run labelled with --embeddings.",
                                       metavar="OUT", show_default=False)],
    weights: Annotated[str, typer.Option(
        help="A checkpoint `label-images fit` wrote for this run.", show_default=False)],
    to: Annotated[str, typer.Option(
        "--out", help="The new run directory for the relabelled table.", show_default=False)],
) -> None:
    """Label every row again from the stored embeddings with a fitted head: no image is
    decoded, no backbone run."""
    from pipeline.relabel import relabel as relabelling

    figures = relabelling(out, weights, to)
    typer.echo(f"{figures['rows']} rows relabelled in {figures['seconds']:.1f} s "
               f"({figures['rows_per_second']:,.0f} rows/s) -> {figures['output']}")


COMMANDS = (export, reviews, fit, relabel)
