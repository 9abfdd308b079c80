"""Label Studio: the chosen rows as tasks with the run's predictions (top-1 and its score,
the top-k beside the image), the labelling config that matches them, imported through its
API in batches or written as a JSON file to import by hand; people's annotations read back
from a JSON export."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pyarrow as pa

from pipeline.options import Option
from pipeline.errors import RunError, UsageError, notice
from pipeline.review.base import REVIEW_SCHEMA, ReviewTarget, Run
from pipeline.storage import atomic_path, is_remote
from pipeline.summary import count

CHOICES = "label"  # the control people answer in; predictions fill it in
OTHER = "other"  # free text: the right label when it is none of the choices
IMPORT_BATCH = 1000  # tasks a request: well under its 250K tasks and 200 MB
TIMEOUT_S = 60
LOCAL_FILES = "/data/local-files/?d="  # how Label Studio serves a file under its root


def label_config(labels: list[str]) -> str:
    """The labelling interface: the image, its key and the model's top-k; one choice among
    the labels of the exported rows' top-k, or another label typed in."""
    choices = "\n".join(f"    <Choice value={quoteattr(label)}/>" for label in labels)
    return f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <Text name="key" value="$key"/>
  <Text name="top_k" value="$top_k"/>
  <Choices name="{CHOICES}" toName="image" choice="single" showInline="true">
{choices}
  </Choices>
  <TextArea name="{OTHER}" toName="image" maxSubmissions="1" editable="true"
            placeholder="None of these? The right label"/>
</View>
"""


def image_url(path: str, root: str | None) -> str:
    """Where Label Studio finds the image: an object store's URL as it is (a cloud storage
    connected to the project signs it), a local file through Label Studio's local-files
    serving under `root` (its LOCAL_FILES_DOCUMENT_ROOT)."""
    if is_remote(path):
        return path
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, os.path.abspath(root or os.sep))
    if relative.startswith(os.pardir):
        raise UsageError(f"{path} is not under --local-files-root {root}: Label Studio serves "
                         "local files only below its LOCAL_FILES_DOCUMENT_ROOT")
    return LOCAL_FILES + urllib.parse.quote(relative.replace(os.sep, "/"), safe="/")


def task(row: dict, run: Run, root: str | None) -> dict:
    top_k = ", ".join(f"{label} {score:.3f}" for label, score in zip(row["labels"],
                                                                    row["scores"]))
    return {"data": {"image": image_url(row["path"], root), "key": row["key"],
                     "path": row["path"], "top_k": f"{run.model}: {top_k}"},
            "predictions": [{"model_version": run.model_version,
                             "score": round(float(row["top1_score"]), 6),
                             "result": [{"from_name": CHOICES, "to_name": "image",
                                         "type": "choices",
                                         "value": {"choices": [row["top1_label"]]}}]}]}


def tasks(rows: Iterable[pa.Table], run: Run, root: str | None) -> Iterator[list[dict]]:
    """The tasks, a batch of IMPORT_BATCH at a time."""
    batch = []
    for table in rows:
        for row in table.to_pylist():
            batch.append(task(row, run, root))
            if len(batch) == IMPORT_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


class LabelStudio(ReviewTarget):
    name = "label-studio"
    options = (
        Option("file", str, "write the tasks here (JSON) and the labelling config beside "
               "it (.xml), to import by hand"),
        Option("url", str, "import into the server at this URL through its API"),
        Option("token", str, "a personal access token (default: LABEL_STUDIO_API_KEY)"),
        Option("project", int, "add to this project (tasks already there are skipped); "
               "default: a new project"),
        Option("title", str, "the new project's title"),
        Option("local_files_root", str, "the folder it serves local files from (its "
               "LOCAL_FILES_DOCUMENT_ROOT); images must be below it"),
    )

    def claims(self, where: str) -> bool:
        """A file of its JSON export: named .json, or starting as JSON does (another
        tool's answers file is left to that tool)."""
        if "://" in where or os.path.isdir(where):
            return False
        if where.lower().endswith(".json"):
            return True
        try:
            with open(where, "rb") as fh:
                return fh.read(64).lstrip()[:1] in (b"[", b"{")
        except OSError:
            return True  # not there: its reader says so in its words

    def export(self, run, rows, labels, options) -> dict:
        if not run.holds_files:
            raise UsageError("this run's images are inside archives or a Parquet column: "
                             "Label Studio shows images by URL or file, so export them as "
                             "files first")
        root = options.get("local_files_root")
        if options.get("url"):
            return _import(run, rows, labels, options, root)
        target = options.get("file")
        if not target:
            raise UsageError("--to label-studio needs --url (and --token) to import into a "
                             "project, or --file tasks.json to import by hand")
        config_path = Path(target).with_suffix(".xml")
        count = 0
        with atomic_path(Path(target)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write("[")  # streamed: one batch of tasks in memory at a time
            for batch in tasks(rows, run, root):
                for item in batch:
                    fh.write((",\n" if count else "\n") + json.dumps(item, ensure_ascii=False))
                    count += 1
            fh.write("\n]\n")
        with atomic_path(config_path) as tmp:
            tmp.write_text(label_config(labels), encoding="utf-8")
        return {"tasks": count, "file": str(target), "label_config": str(config_path)}

    def reviews(self, where: str) -> Iterator[pa.Table]:
        try:
            with open(where, encoding="utf-8") as fh:
                exported = json.load(fh)
        except FileNotFoundError:
            raise UsageError(f"no Label Studio export at {where}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{where} is not a Label Studio JSON export: {exc}") from None
        if not isinstance(exported, list):
            raise UsageError(f"{where} is not a Label Studio JSON export (a list of tasks)")
        rows = [found for item in exported for found in [_answer(item)] if found]
        skipped = sum(1 for item in exported if _only_skipped(item))
        if skipped:
            notice(f"{count(skipped, 'task')} in {where} skipped by people (no answer): not "
                   "counted as reviews")
        yield pa.Table.from_pylist(rows, REVIEW_SCHEMA)


def _only_skipped(item: dict) -> bool:
    """A task whose every annotation is a skip (Label Studio's "was_cancelled")."""
    answers = item.get("annotations") if isinstance(item, dict) else None
    return bool(answers) and all(a.get("was_cancelled") for a in answers)


def _answer(item: dict) -> dict | None:
    """A task's latest answer (the full JSON export), or a JSON_MIN row's; None if nobody
    answered it (or the only answers were skipped)."""
    if "annotations" not in item:  # JSON_MIN: the task's data and the answer, flat
        label = _text(item.get(OTHER)) or _choice(item.get(CHOICES))
        if label is None or "key" not in item:
            return None
        return _row(item["key"], label, item.get("annotator"),
                    item.get("updated_at") or item.get("created_at"), item.get("path"))
    answers = [a for a in item.get("annotations") or [] if not a.get("was_cancelled")]
    if not answers:
        return None
    latest = max(answers, key=lambda a: a.get("updated_at") or a.get("created_at") or "")
    choice = other = None
    for result in latest.get("result") or []:
        value = result.get("value") or {}
        if result.get("from_name") == CHOICES:
            choice = _choice(value.get("choices"))
        elif result.get("from_name") == OTHER:
            other = _text(value.get("text"))
    label = other or choice
    if label is None:
        return None
    data = item.get("data") or {}
    return _row(data.get("key"), label, latest.get("completed_by"),
                latest.get("updated_at") or latest.get("created_at"), data.get("path"))


def _choice(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("choices")
    if isinstance(value, list):
        return value[0] if value else None
    return value or None


def _text(value) -> str | None:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    return value.strip() or None if isinstance(value, str) else None


def _row(key, label: str, who, when, path=None) -> dict:
    """One answer; `path`: the image's, as the task carried it (label-images' tasks do)."""
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return {"key": str(key) if key is not None else None, "label": label,
            "reviewer": None if who is None else str(who), "reviewed_at": _time(when),
            "tool": "label-studio", "path": None if path is None else str(path)}


def _time(text) -> datetime | None:
    if not text:
        return None
    try:
        found = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


class Api:
    """Label Studio's REST API with a token (its legacy token or a personal access token)."""

    def __init__(self, url: str, token: str | None):
        if not token:
            raise UsageError("--url needs a Label Studio token: --token, or "
                             "LABEL_STUDIO_API_KEY in the environment")
        self.url, self.token = url.rstrip("/"), token
        self._access: str | None = None

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": self._authorization()})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                text = response.read().decode() or "null"
        except urllib.error.HTTPError as exc:
            detail = " ".join(exc.read().decode(errors="replace")[:300].split())
            if exc.code == 401:
                raise self._refused(detail) from None
            raise RunError(f"Label Studio at {self.url} refused {method} {path}: "
                           f"{exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RunError(f"Label Studio at {self.url} does not answer ({reason}); what "
                           "was imported so far stays: run the same command again") from None
        return json.loads(text)

    def _authorization(self) -> str:
        # a personal access token (a JWT refresh token) is exchanged for an access token
        if self.token.count(".") == 2:
            if self._access is None:
                request = urllib.request.Request(
                    self.url + "/api/token/refresh", method="POST",
                    data=json.dumps({"refresh": self.token}).encode(),
                    headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                        self._access = json.loads(response.read())["access"]
                except urllib.error.HTTPError as exc:
                    raise self._refused(" ".join(exc.read().decode(errors="replace")[:300]
                                                 .split())) from None
            return f"Bearer {self._access}"
        return f"Token {self.token}"

    def _refused(self, detail: str) -> RunError:
        """The token refused: which one Label Studio wants, and where it is."""
        try:  # Label Studio's JSON error: its "detail" is the reason
            detail = str(json.loads(detail).get("detail") or detail)
        except (ValueError, AttributeError):
            pass
        legacy = ("; legacy tokens are off in this organization (an admin turns them on "
                  "under Organization > Settings > Access Token Settings)"
                  if "legacy" in detail.lower() else "")
        return RunError(f"Label Studio at {self.url} refused the token ({detail}){legacy}: "
                        "pass a personal access token (your user icon > Account & Settings "
                        "> Personal Access Token) with --token or LABEL_STUDIO_API_KEY")

    def keys(self, project: int) -> set[str]:
        """The keys of the tasks already in the project (an interrupted import, resumed)."""
        found, page = set(), 1
        while True:
            try:
                answer = self.call("GET", f"/api/tasks?project={project}&page={page}"
                                          "&page_size=1000&fields=all")
            except RunError as exc:
                if " 404 " in str(exc):  # past the last page
                    return found
                raise
            items = answer.get("tasks", []) if isinstance(answer, dict) else answer
            found.update(str((t.get("data") or {}).get("key")) for t in items)
            if not items or len(items) < 1000:
                return found
            page += 1


def _import(run: Run, rows, labels: list[str], options: dict, root: str | None) -> dict:
    api = Api(options["url"], options.get("token") or os.environ.get("LABEL_STUDIO_API_KEY"))
    project = options.get("project")
    if project is None:
        created = api.call("POST", "/api/projects", {
            "title": (options.get("title") or f"{run.model} {Path(run.out).name}")[:50],
            "label_config": label_config(labels)})
        project, there = created["id"], set()
    else:
        project = int(project)
        there = api.keys(project)
    imported, served = 0, set()
    for batch in tasks(rows, run, root):
        batch = [t for t in batch if t["data"]["key"] not in there]
        for folder in {_top_folder(t["data"]["path"], root) for t in batch} - served - {None}:
            _serve_local_files(api, project, folder)
            served.add(folder)
        if batch:
            api.call("POST", f"/api/projects/{project}/import?commit_to_project=true", batch)
            imported += len(batch)
    return {"tasks": imported, "skipped": len(there), "project": project,
            "url": f"{api.url}/projects/{project}"}


def _top_folder(path: str, root: str | None) -> str | None:
    """The folder right below the local-files root that holds a local image: Label Studio
    serves a file to a project only under a local-files storage of that project, and a
    storage must be a folder below its root, not the root itself."""
    if is_remote(path):
        return None
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root or os.sep))
    first, sep, _ = relative.partition(os.sep)
    if not sep:
        raise UsageError(f"{path} lies directly in --local-files-root {root}: Label Studio "
                         "serves files only from folders below it; give their parent's "
                         "parent as the root")
    return os.path.join(os.path.abspath(root or os.sep), first)


def _serve_local_files(api: Api, project: int, path: str) -> None:
    """A local-files storage of the project for `path`, unless it has one."""
    storages = api.call("GET", f"/api/storages/localfiles?project={project}") or []
    if any(s.get("path") == path for s in storages):
        return
    api.call("POST", "/api/storages/localfiles", {
        "project": project, "path": path, "title": "label-images", "use_blob_urls": False})


TARGET = LabelStudio()
