"""The loader alone on the same images kept as loose files and as tar shards, on local disk
and on a loopback S3 server (moto): the README's storage table.

    .venv/bin/python -m benchmarks.loose_vs_tar [FOLDER] [--images 2000] [--per-tar 250]

FOLDER holds JPEGs (made with tests/photos.py at 500x375 when absent). Needs the test
extra (moto's server, s3fs). Each figure is `label-images bench SOURCE --loader-only` in a
fresh process, with the same workers and batch size for all four.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import s3fs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}


def make_photos(folder: Path, count: int) -> None:
    from tests.photos import photo

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(500, 375, seed=i).save(folder / f"{i:05d}.jpg", quality=90)


def write_tars(files: list[Path], folder: Path, per_tar: int) -> None:
    """As img2dataset writes them: NNNNN.tar, members NNNNNNNNN.jpg and .json."""
    folder.mkdir(parents=True)
    for first in range(0, len(files), per_tar):
        with tarfile.open(folder / f"{first // per_tar:05d}.tar", "w") as archive:
            for i, path in enumerate(files[first:first + per_tar], start=first):
                archive.add(path, f"{i:09d}.jpg")
                meta = json.dumps({"key": f"{i:09d}", "source": path.name}).encode()
                info = tarfile.TarInfo(f"{i:09d}.json")
                info.size = len(meta)
                archive.addfile(info, io.BytesIO(meta))


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("moto server did not start") from None
            time.sleep(0.1)


def loader_alone(source: str, args, env: dict, report: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pipeline", "bench", source, "--loader-only",
                    "--images", str(args.images), "--workers", str(args.workers),
                    "--batch-size", str(args.batch_size), "--json", str(report)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())["figures"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-tar", type=int, default=250)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loose-vs-tar-") as tmp:
        work = Path(tmp)
        folder = args.folder or work / "photos"
        if not folder.exists():
            make_photos(folder, args.images)
        files = sorted(folder.glob("*.jpg"))[:args.images]
        loose = work / "loose"
        loose.mkdir()
        for path in files:
            shutil.copyfile(path, loose / path.name)
        write_tars(files, work / "shards", args.per_tar)
        server, endpoint = start_s3()
        try:
            env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
            fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint)
            fs.mkdir("bench")
            fs.put(str(loose), "bench/loose", recursive=True)
            fs.put(str(work / "shards"), "bench/shards", recursive=True)
            rows = [("local disk", "loose files", str(loose)),
                    ("local disk", f"tar shards ({args.per_tar} a tar)", str(work / "shards")),
                    ("S3 (moto, loopback)", "loose files", "s3://bench/loose"),
                    ("S3 (moto, loopback)", f"tar shards ({args.per_tar} a tar)",
                     "s3://bench/shards")]
            print(f"{len(files)} images, {args.workers} worker(s), batches of "
                  f"{args.batch_size}: loader alone, images/s")
            print("| storage | layout | images/s |\n| --- | --- | --- |")
            for storage, layout, source in rows:
                figure = loader_alone(source, args, env, work / "report.json")
                print(f"| {storage} | {layout} | {figure['images_per_second']:.0f} |",
                      flush=True)
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
