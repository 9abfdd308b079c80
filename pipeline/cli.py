"""The `label-images` command: config file + flags -> one frozen RunConfig -> runner."""

from __future__ import annotations

import functools
import os
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline import config as configuration, engines, kinds, runtimes
from pipeline.errors import Interrupted, RunError, UsageError
from pipeline.options import ALIASED, parse_flags
from pipeline.review import commands as review_commands

def _as_flag(option):
    """--help/-h shown as the flag it is, with no value type beside it."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(TyperCommand):
    def get_help_option(self, ctx):
        return _as_flag(super().get_help_option(ctx))


class _Group(TyperGroup):
    def get_help_option(self, ctx):
        return _as_flag(super().get_help_option(ctx))


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    cls=_Group, context_settings=HELP_OPTIONS,
    help="Label image collections with a classifier (torchvision, timm, Keras): top-k labels "
         f"to {', '.join(configuration.FORMATS[:-1])} or {configuration.FORMATS[-1]}, "
         "resumable.",
)


# The choices Typer shows and checks, from the one list each that config.py validates with.
# The defaults the help states, from the config's own. "(default: ...)", not Typer's
# "[default: ...]": its Rich help takes square brackets for markup and drops them.
_DEFAULT = configuration.RunConfig


def _version(shown: bool) -> None:
    if shown:
        from pipeline import __version__

        typer.echo(f"label-images {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, metavar="",
        help="Show the version and exit.")] = None) -> None:
    """Label image collections with a classifier (torchvision, timm, Keras)."""


def one_line_errors(command):
    """Our fatal errors end a command as one line on stderr and their exit code, no traceback."""
    @functools.wraps(command)  # Typer reads the options from the wrapped signature
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (UsageError, RunError, Interrupted) as exc:
            typer.echo(f"label-images: error: {exc}", err=True)
            if getattr(exc, "exit_at_once", False):  # nothing left to tidy that we own
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
    return wrapper


def _resolve(config: Path | None, flags: dict) -> configuration.RunConfig:
    """defaults < the --config file < flags."""
    file_values = configuration.read_toml(str(config)) if config else {}
    return configuration.resolve(file_values, flags)


# Each option is declared once, here, and used by every command that takes it.
Source = Annotated[Optional[str], typer.Argument(
    help="A folder of images, a manifest (.csv .tsv .parquet .jsonl .txt), WebDataset tar "
         "shards, or Parquet with the images' bytes in a column.",
    show_default=False, metavar="SOURCE")]
Out = Annotated[Optional[str], typer.Option(
    "--out", "-o", help="Run directory, a path or a URL such as s3://bucket/run "
                        "(default: outputs/<source name>).", show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML file with any of these options; flags override it.")]
MODEL_HELP = ("A torchvision model name (resnet50, efficientnet_b0, ...), timm:NAME for a "
              "timm model, or keras:PATH for a .keras/.h5 file")
Model = Annotated[Optional[str], typer.Option(help=f"{MODEL_HELP} (default: {_DEFAULT.model}).")]
Weights = Annotated[Optional[str], typer.Option(
    help="Named weights (torchvision's DEFAULT, IMAGENET1K_V2, ...; timm's pretrained tag) "
         f"or a local checkpoint file (default: {_DEFAULT.weights}).")]
Labels = Annotated[Optional[Path], typer.Option(
    help="Class names: a file, one a line in class-index order, or a training folder (its "
         "subfolders in alphabetical order, as Keras numbers them).")]
InputMode = Annotated[Optional[str], typer.Option(
    help="The model's input values: rgb or bgr (pixels 0-255 as they are), or the Keras "
         "applications' caffe, torch or tf (default: from the weights; Keras models: bgr).")]
Resize = Annotated[Optional[int], typer.Option(
    help="Resize the shorter side to this (default: from the weights, else 256).")]
Crop = Annotated[Optional[int], typer.Option(
    help="Centre crop size (default: from the weights, else 224).")]
Device = Annotated[Optional[str], typer.Option(
    help=f"auto, cpu, cuda or cuda:N (default: {_DEFAULT.device}).")]


def _precisions() -> str:
    """The precisions the registered runtimes run; one that a runtime alone offers, with
    its name (int8 (openvino))."""
    said = [p + (f" ({only[0]})" if len(only := runtimes.offering(p)) == 1 else "")
            for p in ("auto", *runtimes.precisions())]
    return ", ".join(said[:-1]) + " or " + said[-1]


PrecisionOption = Annotated[Optional[str], typer.Option(
    "--precision", metavar="PRECISION",
    help=f"{_precisions()}; auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 "
         f"(default: {_DEFAULT.precision}).")]


def _declared_help(name: str) -> str:
    """The help of a flag kept for a declared option: what the kinds declaring it say."""
    said = dict.fromkeys(option.help + (f" (default: {option.default})"
                                        if option.default is not None else "")
                         for _, option in kinds.declared(name))
    return "; ".join(said) + f". The same as --option {name}=VALUE."


Int8Agreement = Annotated[Optional[float], typer.Option(help=_declared_help("int8_agreement"))]
BatchSize = Annotated[Optional[int], typer.Option(
    help="Images per batch (default: the fastest, measured on this machine and cached).")]
Workers = Annotated[Optional[int], typer.Option(
    help="Decoding worker processes; 0 decodes between batches (default: from the measured "
         "model and decode rates).")]
# free text, checked by the config against the registries: a kind registered after this
# module was imported (a plugin, a test's) is taken as the built-in ones are
FormatOption = Annotated[Optional[str], typer.Option(
    "--format", metavar="FORMAT",
    help=f"Output format: {', '.join(configuration.FORMATS[:-1])} or "
         f"{configuration.FORMATS[-1]} (default: {_DEFAULT.format}).")]
TableOption = Annotated[Optional[str], typer.Option("--table", help=_declared_help("table"))]
CatalogOption = Annotated[Optional[str], typer.Option("--catalog",
                                                      help=_declared_help("catalog"))]
TopK = Annotated[Optional[int], typer.Option(
    help=f"Labels per image (default: {configuration.DEFAULT_TOP_K}, or the model's classes if "
         "it has fewer).")]
ShardSize = Annotated[Optional[int], typer.Option(
    help="Images per shard, the unit of commit and resume (default: 1000, or a 16th of a job "
         "under 16,000 images, at least 16: a kill loses at most a shard).")]
PathColumn = Annotated[Optional[str], typer.Option(
    help="Manifest column with the image paths (default: detected).")]
ImageColumn = Annotated[Optional[str], typer.Option(
    help="Parquet column with the images' bytes (default: the one binary or image column).")]
IdColumn = Annotated[Optional[str], typer.Option(
    help="Manifest column with a stable id, used as the key (default: the path).")]
Root = Annotated[Optional[str], typer.Option(
    help="Folder that relative manifest paths resolve against (default: the manifest's).")]
KeepColumns = Annotated[Optional[str], typer.Option(
    help="Manifest columns to copy into the output, comma-separated.")]
MaxPixels = Annotated[Optional[int], typer.Option(
    help="Images larger than this (width x height) become error rows (default: "
         f"{_DEFAULT.max_pixels:,}).")]
AllowDuplicates = Annotated[Optional[bool], typer.Option(
    "--allow-duplicates", metavar="", help="Accept a manifest that lists a key twice.")]
Overwrite = Annotated[Optional[bool], typer.Option(
    "--overwrite", metavar="", help="Discard a previous run in --out and start afresh.")]
Quiet = Annotated[Optional[bool], typer.Option(
    "--quiet", "-q", metavar="", help="No progress (a bar; in a log, a line a minute).")]
Compile = Annotated[Optional[bool], typer.Option(
    "--compile", metavar="", help="torch.compile the model (default: when the images to label repay "
                      "the compile time at the measured rates).")]
RuntimeOption = Annotated[Optional[str], typer.Option(
    "--runtime", help=f"What runs the model: {', '.join(runtimes.RUNTIMES)} (an extra, if "
                      "its library is not installed), or auto: measured among those installed "
                      "(default: auto).")]
NoCompile = Annotated[Optional[bool], typer.Option(
    "--no-compile", metavar="", help="Never compile the model.")]
Embeddings = Annotated[Optional[bool], typer.Option(
    "--embeddings", metavar="", help="Also write each image's pooled penultimate features (float32) to "
                         "Parquet, from the same forward pass.")]
Incremental = Annotated[Optional[bool], typer.Option(
    "--incremental", metavar="", help="Nightly mode: label only new and changed images, drop removed "
                          "ones, keep the rest.")]
DriftThreshold = Annotated[Optional[float], typer.Option(
    help="--incremental: say in one line when the labels shift this much since the night "
         "before (PSI of the class shares or top-1 scores) (default: 0.1).")]
NumSlices = Annotated[Optional[int], typer.Option(
    help="Split the job into this many slices (array jobs); see --slice-index.")]
SliceIndex = Annotated[Optional[int], typer.Option(
    help="The slice this process labels, 0-based (default: SLURM_ARRAY_TASK_ID or "
         "JOB_COMPLETION_INDEX).")]
Engine = Annotated[Optional[str], typer.Option(
    help=f"Who hands out the shards: {' or '.join(engines.ENGINES)} (local: this process, "
         "torchrun and array slices split up front; "
         + "; ".join(f"{name}: an extra" for name in engines.ENGINES if name != "local")
         + ") (default: local).")]
RayAddress = Annotated[Optional[str], typer.Option(help=_declared_help("ray_address"))]
Actors = Annotated[Optional[int], typer.Option(help=_declared_help("actors"))]
KindOption = Annotated[Optional[list[str]], typer.Option(
    "--option", metavar="NAME=VALUE",
    help="An option the chosen format, engine or runtime declares for itself; repeat for "
         "more (a config file's options table holds them too): " + "; ".join(
             f"{option.name} ({kind})" for kind, option in kinds.declared()) + ".")]
# The earlier names of those two, still taken, not shown.
NumShards = Annotated[Optional[int], typer.Option(hidden=True)]
ShardIndex = Annotated[Optional[int], typer.Option(hidden=True)]


def _flags(arguments: dict) -> dict:
    """A command's arguments that are RunConfig fields (or flags kept for declared options,
    which the config moves into `options`), enums as their values."""
    arguments = {**arguments, "options": parse_flags(arguments.get("option")) or None}
    return {name: value.value if isinstance(value, Enum) else value
            for name, value in arguments.items()
            if name in configuration.FIELDS or name == configuration.COMPILE_ALIAS
            or name in ALIASED}


@app.command(cls=_Command)
@one_line_errors
def run(source: Source = None, out: Out = None, config: ConfigFile = None, model: Model = None,
        weights: Weights = None, labels: Labels = None, resize: Resize = None,
        crop: Crop = None, input_mode: InputMode = None, device: Device = None,
        precision: PrecisionOption = None, int8_agreement: Int8Agreement = None,
        batch_size: BatchSize = None, workers: Workers = None, format: FormatOption = None,
        table: TableOption = None, catalog: CatalogOption = None,
        top_k: TopK = None, shard_size: ShardSize = None, path_column: PathColumn = None,
        id_column: IdColumn = None, image_column: ImageColumn = None, root: Root = None,
        keep_columns: KeepColumns = None, max_pixels: MaxPixels = None,
        allow_duplicates: AllowDuplicates = None, overwrite: Overwrite = None, quiet: Quiet = None, compile: Compile = None,
        no_compile: NoCompile = None, runtime: RuntimeOption = None,
        embeddings: Embeddings = None,
        incremental: Incremental = None, drift_threshold: DriftThreshold = None,
        engine: Engine = None, ray_address: RayAddress = None,
        actors: Actors = None, option: KindOption = None,
        num_slices: NumSlices = None, slice_index: SliceIndex = None,
        num_shards: NumShards = None, shard_index: ShardIndex = None) -> None:
    """Label every image of SOURCE into OUT/labels.parquet (or CSV, Delta, Iceberg); rerun to resume."""
    started = time.perf_counter()  # the summary's elapsed time counts torch's import too
    num_slices = num_slices if num_slices is not None else num_shards
    slice_index = slice_index if slice_index is not None else shard_index
    compile = False if no_compile else compile
    resolved = _resolve(config, _flags(locals()))
    _check_source_exists(resolved.source)
    # What the source can refuse cheaply (a manifest's columns), and a finished run asked
    # for again, are answered before torch is imported: seconds sooner
    from pipeline.finished import answer
    from pipeline.sources import open_source

    open_source(resolved.source_spec()).check()

    done = answer(resolved)
    if done is not None:
        typer.echo(done.line(), err=True)
        return
    # Imported here, so that --help and config errors need no torch.
    # An incremental night lists and compares, then labels its increment with the engine.
    if resolved.incremental:
        from pipeline.incremental import run as label
    else:
        from pipeline.runner import run as label
    typer.echo(label(resolved, started=started).line(), err=True)


def _check_source_exists(source: str) -> None:
    """A local SOURCE that is not there, said before torch is imported (seconds): the
    source kinds say the rest once it is. URLs and patterns (shards/{0..9}.tar) are theirs."""
    if "://" in source or any(mark in source for mark in "{*?["):
        return
    if not Path(source).expanduser().exists():
        raise UsageError(f"source not found: {source}")


@app.command(cls=_Command)
@one_line_errors
def merge(
    out: Annotated[str, typer.Argument(help="The run directory the slices wrote to.",
                                       metavar="OUT", show_default=False)],
    format: Annotated[Optional[str], typer.Option(
        "--format", metavar="FORMAT", help="Output format (default: the run's).")] = None,
) -> None:
    """Assemble OUT/labels.* once every slice of an array job has committed its shards."""
    from pipeline import runner

    typer.echo(runner.merge(out, format).line(), err=True)


@app.command(cls=_Command)
@one_line_errors
def bench(
    source: Annotated[str, typer.Argument(
        help="A folder of images or a manifest to sample (any kind with --loader-only).",
        metavar="SOURCE", show_default=False)],
    images: Annotated[int, typer.Option(
        help="Images to use from SOURCE (default: 500).", show_default=False)] = 500,
    reference_images: Annotated[int, typer.Option(
        help="Images for the (slow) tutorials' loop (default: 64).", show_default=False)] = 64,
    plan_rows: Annotated[Optional[int], typer.Option(
        help="Also time planning a generated manifest of this many rows.")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the figures to this JSON file.")] = None,
    fidelity: Annotated[bool, typer.Option(
        "--fidelity", metavar="", help="Only compare our crops with the reference transform's on the "
                           "first --images of SOURCE (mean, max, worst file); no model is "
                           "loaded.")] = False,
    loader_only: Annotated[bool, typer.Option(
        "--loader-only", metavar="", help="Only time the loader alone on the first --images of SOURCE, "
                              "of any kind (to compare storage layouts); no model is "
                              "loaded.")] = False,
    config: ConfigFile = None, model: Model = None, weights: Weights = None,
    resize: Resize = None, crop: Crop = None, device: Device = None,
    precision: PrecisionOption = None, int8_agreement: Int8Agreement = None,
    batch_size: BatchSize = None, workers: Workers = None,
    top_k: TopK = None, compile: Compile = None, no_compile: NoCompile = None,
    runtime: RuntimeOption = None,
    path_column: PathColumn = None, id_column: IdColumn = None, root: Root = None,
    max_pixels: MaxPixels = None,
) -> None:
    """Measure decode, loader alone, model alone, end to end and the tutorials' loop."""
    compile = False if no_compile else compile
    resolved = _resolve(config, _flags(locals()))
    if images < 1 or reference_images < 1:
        raise UsageError("--images and --reference-images must be at least 1")
    from pipeline import bench as benchmark
    from pipeline.bench import render

    if fidelity and loader_only:
        raise UsageError("--fidelity and --loader-only are two different benchmarks: one at a time")
    if fidelity:
        result = benchmark.fidelity_only(resolved, images)
        typer.echo(result["fidelity_text"])
    elif loader_only:
        result = benchmark.loader_only(resolved, images)
        typer.echo(render.render_loader_only(result))
    else:
        result = benchmark.bench(resolved, images, reference_images, plan_rows)
        typer.echo(render.render(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command(cls=_Command)
@one_line_errors
def report(
    out: Annotated[str, typer.Argument(help="A finished run directory (path or URL).",
                                       metavar="OUT", show_default=False)],
    html_file: Annotated[Optional[Path], typer.Option(
        "--html", help="Also write one self-contained HTML page here.")] = None,
    review_below: Annotated[Optional[float], typer.Option(
        help="With --export: rows whose top-1 score is below this.")] = None,
    export: Annotated[Optional[Path], typer.Option(
        help="CSV of the rows to review (key, path, top1_label, top1_score).")] = None,
    precision: Annotated[float, typer.Option(
        help="With reviews: the top-1 score at which the reviewed images are this precise, "
             "and the share of the collection scored at least that (default: 0.95).",
        show_default=False)] = 0.95,
) -> None:
    """Summarise a run: counts, errors by kind, frequent labels, confidence; HTML; review CSV."""
    if (review_below is None) != (export is None):
        raise UsageError("--review-below and --export go together")
    from pipeline import report as reporting
    from pipeline.report_page import render_html
    from pipeline.review.reviews import agreement
    from pipeline.rundir import agreement_history
    from pipeline.storage import Store, atomic_path

    found = reporting.analyse(reporting.read_batches(out))  # one pass, bounded memory
    found.run = reporting.describe_run(out)
    found.agreement = agreement(out)
    found.agreement_history = agreement_history(Store(out))
    if found.agreement:
        from pipeline.review import calibration

        found.calibration = calibration.figures(out, precision)
    found.drift = reporting.last_night(out)
    typer.echo(reporting.render_text(found))
    if html_file is not None:
        with atomic_path(html_file) as tmp:
            tmp.write_text(render_html(found, f"label-images report: {out}"))
        typer.echo(f"report page: {html_file}")
    if export is not None:
        count = reporting.export_review(reporting.read_batches(out), review_below,
                                        str(export))
        typer.echo(f"{count} rows below {review_below} -> {export}")


# export, reviews, fit, relabel: what people's answers go through (pipeline/review/commands.py)
for _review_command in review_commands.COMMANDS:
    app.command(cls=_Command)(one_line_errors(_review_command))


weights_app = typer.Typer(no_args_is_help=True, cls=_Group, context_settings=HELP_OPTIONS,
                          help="List the named weights (torchvision, timm); stage them for "
                               "offline machines.")
app.add_typer(weights_app, name="weights")


@weights_app.command("list", cls=_Command)
@one_line_errors
def weights_list(
    model: Annotated[Optional[str], typer.Option(help="Only this model's weights.")] = None,
) -> None:
    """Weights usable with --model/--weights: classes, published top-1, size, cached here."""
    from pipeline import weights

    typer.echo(weights.render(weights.catalogue(model)))


@weights_app.command("fetch", cls=_Command)
@one_line_errors
def weights_fetch(
    model: Annotated[str, typer.Option(help=f"{MODEL_HELP} (default: resnet50).",
                                       show_default=False)] = "resnet50",
    weights_name: Annotated[str, typer.Option(
        "--weights", help="Weights name (default: DEFAULT).", show_default=False)] = "DEFAULT",
    to: Annotated[Optional[str], typer.Option(
        help="Folder to put the file in (default: torch's cache on this machine).")] = None,
) -> None:
    """Download one weights file on a connected machine, check its hash, say how to use it."""
    from pipeline import weights

    path = weights.fetch(model, weights_name, to)
    typer.echo(f"{path} (sha256 checked)")
    typer.echo(f"offline: copy it into $TORCH_HOME/hub/checkpoints/ (default "
               f"~/.cache/torch/hub/checkpoints/), or run with "
               f"--model {model} --weights /path/to/{path.name}")


def main() -> None:
    """Console entry point: usage errors become one line and exit 2, like ours."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # the parser's bad-usage errors (exit code 2)
        typer.echo(f"label-images: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C before labelling began: nothing written
        typer.echo("label-images: interrupted", err=True)
        sys.exit(130)
    sys.exit(code or 0)
