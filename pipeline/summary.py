"""What a run did: counts, timings and the one line it ends with; written as summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field


DECODE_BOUND = 0.5  # of the loop spent waiting for batches, above which decode is said to limit


def count(number: int, noun: str) -> str:
    """'1 error', '2 errors', '0 errors'."""
    return f"{number} {noun}" + "s" * (number != 1)


@dataclass
class RunSummary:
    output: str  # path or URL of the final table
    run_dir: str = ""
    items: int = 0
    ok: int = 0
    errors: int = 0
    labelled_now: int = 0  # images labelled by this invocation (resume skips the rest)
    errors_now: int = 0  # of those, the ones that are error rows (the bar counts them)
    seconds: float = 0.0
    loop_seconds: float = 0.0  # the labelling loop alone: no start-up, no merge
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    resumed: bool = False
    already_complete: bool = False
    slice_done: str = ""  # set when this process labelled one slice and did not merge
    missing: list[int] = field(default_factory=list)  # shards other slices still owe
    changes: dict = field(default_factory=dict)  # incremental runs: new/changed/unchanged/removed
    drift: dict = field(default_factory=dict)  # incremental runs: the labels against last night's
    # incremental runs: the table's parts, how many tonight wrote, and their rows
    table_parts: dict = field(default_factory=dict)
    stale: str = ""  # a finished run whose source has changed since: what to do about it
    # a cluster engine's workers (Ray's actors, Spark's Python workers): host, images, rate
    cluster_workers: list[dict] = field(default_factory=list)
    worker: str = "actor"  # what the cluster engine calls them, for the summary line
    redone: list[dict] = field(default_factory=list)  # shards redone after an actor died
    lost_nodes: list[str] = field(default_factory=list)  # --engine ray: nodes that went
    loader_restarts: int = 0  # decode workers killed from outside, the loader restarted
    device: str = ""
    precision: str = ""
    settings: dict = field(default_factory=dict)  # what was chosen, and measured for it

    @property
    def images_per_second(self) -> float:
        """Throughput of the labelling loop (start-up and merge are in `seconds`)."""
        return self.labelled_now / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def line(self) -> str:
        changes = (", ".join(f"{v} {k}" for k, v in self.changes.items()) + "; "
                   if self.changes else "")
        if self.already_complete:
            return (f"nothing to do: {changes}{self.output} is complete ({self.items} rows)"
                    + (f"; {self.stale}" if self.stale else ""))
        errors = count(self.errors, "error")
        if not self.labelled_now:  # a merge
            return f"{self.items} images: {self.ok} ok, {errors} -> {self.output}"
        if self.slice_done:
            waiting = (f"{len(self.missing)} shards still to come from other slices, then run "
                       f"`label-images merge {self.run_dir}`" if self.missing else
                       f"all shards are committed: run `label-images merge {self.run_dir}`")
            return (f"{self.slice_done} done: labelled {self.labelled_now} at "
                    f"{self.images_per_second:.1f} images/s; {waiting}")
        actors = "" if not self.cluster_workers else (
            f" by {count(len(self.cluster_workers), self.worker)} ("
            + ", ".join(f"{a['images']} on {a['host']}" for a in self.cluster_workers) + ")"
            + (f", {count(len(self.lost_nodes), 'node')} lost and "
               f"{count(len(self.redone), 'shard')} redone" if self.lost_nodes else ""))
        return (f"{self.items} images: {changes}{self.ok} ok, {errors}; labelled "
                f"{self.labelled_now}{actors} in {self.loop_seconds:.1f} s at "
                f"{self.images_per_second:.1f} images/s, {self.seconds:.1f} s in all (start-up, "
                f"measuring and the merge included){self._bottleneck()} -> {self.output}")

    def _bottleneck(self) -> str:
        """Said when the model waited for decoded batches most of the loop: a faster
        runtime then buys nothing more, more decode cores would."""
        if self.loop_seconds <= 0 or self.load_seconds <= DECODE_BOUND * self.loop_seconds:
            return ""
        return (f"; decoding was the bottleneck ({self.load_seconds / self.loop_seconds:.0%} "
                "of the loop waiting for batches)")

    def engine_record(self, engine: str) -> dict:
        """What a cluster engine did, for run.json: who labelled what, where, what was redone."""
        return {"engine": engine, "worker": self.worker, "cluster_workers": self.cluster_workers,
                "redone": self.redone, "lost_nodes": self.lost_nodes}

    def to_dict(self) -> dict:
        return {
            "output": self.output, "items": self.items, "ok": self.ok,
            "errors": self.errors, "labelled_now": self.labelled_now, "resumed": self.resumed,
            "wall_seconds": round(self.seconds, 3),
            "loop_seconds": round(self.loop_seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "load_seconds": round(self.load_seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "device": self.device, "precision": self.precision,
            **({"settings": self.settings} if self.settings else {}),
            **({"changes": self.changes} if self.changes else {}),
            **({"drift": self.drift} if self.drift else {}),
            **({"table_parts": self.table_parts} if self.table_parts else {}),
            **({"stale": self.stale} if self.stale else {}),
            **({"cluster_workers": self.cluster_workers} if self.cluster_workers else {}),
            **({"redone": self.redone} if self.redone else {}),
            **({"lost_nodes": self.lost_nodes} if self.lost_nodes else {}),
        }
