"""An S3 Inventory report as the listing of a bucket: its manifest.json and the CSV.gz or
Parquet files it names, read a file at a time; each object's size and ETag come with it.

Listing 10^8 objects through the store's API takes hours; the inventory the store writes
each day or week holds the same in a few files. Keys are the objects' keys (CSV reports
URL-encode them: decoded here), paths `s3://SOURCE-BUCKET/KEY`; with versions in the report,
only each object's current version counts, and delete markers none.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import UsageError, notice
from pipeline.sources.base import VERSION_COLUMNS, Source
from pipeline.sources.folder import images_among, say_passed_over
from pipeline.storage import filesystem, open_input

MANIFEST_NAME = "manifest.json"
BATCH_ROWS = 65_536


class InventorySource(Source):
    """An S3 Inventory manifest.json (CSV or Parquet reports)."""

    lists_versions = True  # the report's size and ETag columns

    @classmethod
    def claims(cls, location: str, is_dir: bool) -> bool:
        if not is_dir:
            return posixpath.basename(location.rstrip("/")) == MANIFEST_NAME
        return bool(_reports(location))  # an inventory configuration's folder of reports

    def describe(self) -> dict:
        """The inventory configuration, not tonight's report: a nightly run names the
        newest report each night, and is the same job."""
        described = self.spec.describe()
        location = described["location"].rstrip("/")
        if location.endswith("/" + MANIFEST_NAME):
            location = posixpath.dirname(posixpath.dirname(location))
        return {**described, "location": location, "kind": "s3-inventory"}

    def batches(self) -> Iterator[pa.Table]:
        spec = self.spec
        if spec.path_column or spec.id_column or spec.keep_columns or spec.image_column:
            raise UsageError("--path-column, --id-column and --keep-columns apply to manifests "
                             f"of paths, but {spec.location} is an S3 Inventory report")
        manifest = _read_manifest(_newest(spec.location))
        source, listed = manifest["sourceBucket"], 0
        passed_over: Counter[str] = Counter()
        for name in manifest["files"]:
            for table in _report_file(manifest, name):
                items = _items(_current_objects(table), source)
                items = items.filter(images_among(items["key"], passed_over))
                if items.num_rows:
                    listed += items.num_rows
                    yield items
        say_passed_over(passed_over)

    def list_items(self) -> pa.Table:
        return pa.concat_tables(self.batches())


def _reports(folder: str) -> list[str]:
    """The dated reports' manifests in an inventory configuration's folder, oldest first
    (their folders are named by date and time: YYYY-MM-DDTHH-MMZ)."""
    fs, root = filesystem(folder)
    found = sorted(fs.glob(posixpath.join(root.rstrip("/"), "*", MANIFEST_NAME)))
    if "://" in folder:
        scheme = folder.split("://", 1)[0]
        return [f"{scheme}://{path}" for path in found]
    return found


def _newest(location: str) -> str:
    """A manifest.json as given; for a configuration's folder, its newest report's."""
    if posixpath.basename(location.rstrip("/")) == MANIFEST_NAME:
        return location
    reports = _reports(location)
    if not reports:
        raise UsageError(f"no S3 Inventory report (*/manifest.json) in {location}")
    notice(f"the newest inventory report in {location}: "
           f"{posixpath.basename(posixpath.dirname(reports[-1]))}")
    return reports[-1]


def _read_manifest(location: str) -> dict:
    try:
        with open_input(location) as fh:
            manifest = json.load(fh)
        form = manifest["fileFormat"]
        files = [entry["key"] for entry in manifest["files"]]
        destination = manifest["destinationBucket"].rsplit(":", 1)[-1]
        return {"sourceBucket": manifest["sourceBucket"], "fileFormat": form,
                "fileSchema": manifest.get("fileSchema", ""), "files": files,
                "destination": destination, "location": location}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{location} is not an S3 Inventory manifest ({type(exc).__name__}: "
                         f"{exc})") from None


def _report_file(manifest: dict, key: str) -> Iterator[pa.Table]:
    """One of the report's files (in the destination bucket), a batch at a time, with the
    report's own column names."""
    url = _file_url(manifest, key)
    form = manifest["fileFormat"].lower()
    if form == "parquet":
        with open_input(url) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([batch])
    elif form == "csv":
        names = [n.strip() for n in manifest["fileSchema"].split(",")]
        with open_input(url) as raw, gzip.open(raw) as fh:
            reader = pacsv.open_csv(fh, read_options=pacsv.ReadOptions(
                column_names=names, block_size=16 << 20), convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=True))
            for batch in reader:
                yield pa.Table.from_batches([batch])
    else:
        raise UsageError(f"{manifest['location']}: an inventory in {manifest['fileFormat']} is "
                         "not read; configure the report as CSV or Parquet")


def _file_url(manifest: dict, key: str) -> str:
    """Where a report file is: in the destination bucket, on the manifest's own store; for a
    local copy of the report, below the folder that holds the manifest's prefix."""
    location = manifest["location"]
    if "://" in location:
        return f"{location.split('://', 1)[0]}://{manifest['destination']}/{key}"
    root = os.path.dirname(os.path.abspath(location))
    while not os.path.exists(os.path.join(root, key)) and root != os.path.dirname(root):
        root = os.path.dirname(root)
    return os.path.join(root, key)


# CSV reports name their columns as the manifest's fileSchema (Key, Size, ETag, ...);
# Parquet reports in snake case (key, size, e_tag, ...).
_COLUMNS = {"key": ("key", "Key"), "size": ("size", "Size"), "etag": ("e_tag", "ETag"),
            "latest": ("is_latest", "IsLatest"), "deleted": ("is_delete_marker",
                                                             "IsDeleteMarker")}


def _column(table: pa.Table, what: str) -> pa.ChunkedArray | None:
    for name in _COLUMNS[what]:
        if name in table.column_names:
            return table[name]
    return None


def _current_objects(table: pa.Table) -> pa.Table:
    """Rows of the objects as they are now: the latest version, not a delete marker."""
    keep = None
    for what, wanted in (("latest", True), ("deleted", False)):
        column = _column(table, what)
        if column is None:
            continue
        if not pa.types.is_boolean(column.type):
            column = pc.equal(pc.utf8_lower(column), "true")
        test = pc.fill_null(pc.equal(column, wanted), what == "latest")
        keep = test if keep is None else pc.and_(keep, test)
    return table if keep is None else table.filter(keep)


def _items(table: pa.Table, bucket: str) -> pa.Table:
    key = _column(table, "key")
    if key is None:
        raise UsageError("the S3 Inventory report has no key column")
    if "Key" in table.column_names:  # CSV reports URL-encode keys: only those that need it
        encoded = pc.match_substring_regex(key, r"[%+]")
        if pc.any(encoded).as_py():
            decoded = pa.array([urllib.parse.unquote_plus(k) for k in
                                key.filter(encoded).to_pylist()], pa.string())
            key = pc.replace_with_mask(key.combine_chunks(), encoded.combine_chunks(),
                                       decoded)
    size, etag = _column(table, "size"), _column(table, "etag")
    sizes = (pc.cast(size, pa.int64()) if size is not None
             else pa.nulls(table.num_rows, pa.int64()))
    versions = (pc.replace_substring(etag.cast(pa.string()), '"', "") if etag is not None
                else pa.nulls(table.num_rows, pa.string()))
    paths = pc.binary_join_element_wise(f"s3://{bucket}", key, "/")
    size_column, version_column = VERSION_COLUMNS
    return pa.table({"key": key, "path": paths, size_column: sizes,
                     version_column: versions})
