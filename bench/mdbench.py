#!/usr/bin/env python3
"""mdbench: metadata operations per second, mdtest-like, on the local disk and
on dfsfuse with each metadata engine, in one run.

    python bench/mdbench.py [--procs N] [--files F] [--json FILE]

Each of N processes (default 4) works in a directory of its own and, phase by
phase with all processes starting each phase together: creates F empty files
(default 1,000; open O_CREAT|O_EXCL + close), stats each, lists its directory
(entries listed per second), renames each within the directory, removes each.
A phase's figure is all processes' operations divided by the wall time from
the common start to the last process's end.

Targets, each measured in the same run:
  local        a directory on the local disk (the baseline of the ratios)
  sqlite       dfsfuse, one mount, the embedded SQLite engine
  postgresql   dfsfuse, one mount, its metadata on a PostgreSQL server that
               the benchmark starts on loopback (Debian's postgresql package,
               as the tests do: tests/pgserver.py), fsync on
  pg-2mounts   dfsfuse, two mounts of one file system on that server, the
               processes shared out between them (process n on mount n % 2)

The mounts are made in a scratch directory with three local node stores and
unmounted at the end.

Output: progress on stderr; the table (ops/s and the ratio to the local disk)
on stdout, then the JSON, or the JSON to --json FILE. Needs root (FUSE
mounts, and PostgreSQL run as the postgres user).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the PostgreSQL server the tests use

PHASES = ("create", "stat", "readdir", "rename", "remove")


def progress(message: str) -> None:
    print(f"mdbench: {message}", file=sys.stderr, flush=True)


# -- the workload, in each process ---------------------------------------------


def _phase(name: str, directory: Path, files: int) -> int:
    """Run one phase in `directory`; the number of operations done."""
    if name == "create":
        for i in range(files):
            os.close(os.open(directory / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    elif name == "stat":
        for i in range(files):
            os.stat(directory / f"f{i}")
    elif name == "readdir":
        listed = len(os.listdir(directory))
        assert listed == files, f"{directory} lists {listed} entries, not {files}"
        return listed
    elif name == "rename":
        for i in range(files):
            os.rename(directory / f"f{i}", directory / f"r{i}")
    else:
        for i in range(files):
            os.unlink(directory / f"r{i}")
    return files


def _worker(directory: Path, files: int, barrier, results) -> None:
    directory.mkdir()
    for name in PHASES:
        barrier.wait()
        start = time.perf_counter()
        done = _phase(name, directory, files)
        results.put((name, done, start, time.perf_counter()))
    directory.rmdir()


def measure(roots: list[Path], procs: int, files: int) -> dict[str, float]:
    """ops/s of every phase with `procs` processes, process n under roots[n % len(roots)]."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(procs)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(roots[n % len(roots)] / f"proc{n}", files, barrier, results))
        for n in range(procs)
    ]
    for worker in workers:
        worker.start()
    spans: dict[str, list[tuple[int, float, float]]] = {name: [] for name in PHASES}
    for _ in range(procs * len(PHASES)):
        name, done, start, end = results.get(timeout=1800)
        spans[name].append((done, start, end))
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"a benchmark process under {roots} failed (exit {worker.exitcode})")
    return {
        name: sum(done for done, _, _ in rows) / (max(end for _, _, end in rows) - min(start for _, start, _ in rows))
        for name, rows in spans.items()
    }


# -- targets -------------------------------------------------------------------


def _dfsfuse(*args: object) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dfsfuse", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if result.returncode:
        raise RuntimeError(f"dfsfuse {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


@contextlib.contextmanager
def mounted(base: Path, meta: list[str], format: bool = True) -> Iterator[Path]:
    """A dfsfuse mount under `base` (its own data dir, three local node
    stores); with `meta`, of that database, which `format` makes first."""
    data_dir, mountpoint = base / "data", base / "mnt"
    mountpoint.mkdir(parents=True)
    if meta and format:
        _dfsfuse("format", "--data-dir", data_dir, *meta)
    subprocess.run([sys.executable, str(REPO / "mount.py"), mountpoint, "--data-dir", data_dir, *meta],
                   cwd=REPO, check=True, timeout=120)
    try:
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", mountpoint], check=False, timeout=120)
        lock = data_dir / "lock"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(lock.read_text().split()[0])
            for _ in range(600):  # the daemon drains and exits after the unmount
                os.kill(pid, 0)
                time.sleep(0.1)


@contextlib.contextmanager
def postgres(base: Path) -> Iterator[list[str]]:
    """A PostgreSQL server of the benchmark's own; the --meta arguments of a fresh database."""
    from pgserver import PostgresServer

    server = PostgresServer(base / "server").start()
    try:
        server.create_database("mdbench")
        password_file = base / "password"
        password_file.write_text(server.password + "\n")
        password_file.chmod(0o600)
        yield ["--meta", server.url("mdbench"), "--meta-password-file", password_file]
    finally:
        server.stop()


def run(procs: int, files: int) -> dict[str, dict[str, float]]:
    scratch = Path(tempfile.mkdtemp(prefix="mdbench-"))
    scratch.chmod(0o755)  # the PostgreSQL server runs as the postgres user
    figures: dict[str, dict[str, float]] = {}
    targets: list[tuple[str, Callable[[], contextlib.AbstractContextManager[Path]]]] = [
        ("local", lambda: contextlib.nullcontext(_fresh(scratch / "local"))),
        ("sqlite", lambda: mounted(scratch / "sqlite", [])),
    ]
    try:
        for name, target in targets:
            progress(f"{name}: {procs} processes x {files} files")
            with target() as root:
                figures[name] = measure([root], procs, files)
        with postgres(scratch / "pg") as meta, mounted(scratch / "postgresql", meta) as root:
            progress(f"postgresql: {procs} processes x {files} files")
            figures["postgresql"] = measure([root], procs, files)
            with mounted(scratch / "postgresql-b", meta, format=False) as other:
                progress(f"pg-2mounts: {procs} processes x {files} files")
                figures["pg-2mounts"] = measure([root, other], procs, files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return figures


def _fresh(path: Path) -> Path:
    path.mkdir()
    return path


def print_table(figures: dict[str, dict[str, float]]) -> None:
    targets = list(figures)
    print(f"{'phase':<9}" + "".join(f"{name + ' ops/s':>18}" for name in targets) + "   (x local)")
    for phase in PHASES:
        local = figures["local"][phase]
        cells = [f"{figures[name][phase]:>12,.0f}" + (f" {figures[name][phase] / local:>4.2f}x" if name != "local"
                                                     else " " * 6) for name in targets]
        print(f"{phase:<9}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4, help="processes (default 4)")
    parser.add_argument("--files", type=int, default=1000, help="files per process (default 1000)")
    parser.add_argument("--json", metavar="FILE", help="write the JSON to FILE instead of stdout")
    args = parser.parse_args(argv)
    if args.procs < 1 or args.files < 1:
        parser.error("--procs and --files must be positive")
    figures = run(args.procs, args.files)
    print_table(figures)
    document = json.dumps({"procs": args.procs, "files": args.files, "ops_per_second": figures}, indent=2)
    if args.json:
        Path(args.json).write_text(document + "\n")
    else:
        print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
