#!/usr/bin/env python3
"""fsbench: the workloads users feel, on a mount and on the local disk, side by side.

    python bench/fsbench.py MOUNTPOINT [--baseline DIR] [--json FILE]
                            [--only NAMES] [--size-mib N] [--seconds S]

Every workload runs on the mount and then on a baseline directory on the local
disk, in the same run, each in a fresh subdirectory, and the table shows both
figures and their ratio (mount / local). Absolute figures drift a lot on
shared machines; the ratio against the local disk in the same run is what to
compare between runs.

Workloads (the names are what --only takes, comma separated):

  seqwrite    write one file of --size-mib MiB (default 1 GiB) in 1 MiB writes,
              then fsync (MB/s, 1 MB = 10**6 bytes)
  seqread     drop caches, read that file in 1 MiB reads (MB/s)
  randread    drop caches, os.pread of random aligned 4 KiB blocks of that file,
              one thread, --seconds seconds (IOPS); the page cache warms up
              during the run, on both sides alike
  randwrite   os.pwrite of random aligned 4 KiB blocks of that file, one thread,
              --seconds seconds, then fsync; the fsync is inside the timing (IOPS)
  smallfiles  5,000 files of 4 KiB in 50 directories: create (files/s), stat
              all (ops/s), drop caches and read all (files/s), delete all
              (ops/s); mkdir and rmdir of the 50 directories are timed too
  srctree     `cp -a`, `diff -r`, `rm -rf` of the standard library of the
              running Python (seconds), without site-packages, __pycache__,
              the regression tests (test/) and config-*/ (a static
              libpython): about 1,100 files and 33 MB for Python 3.11; it is
              first copied to a scratch directory on the local disk, so both
              sides read the same warm source
  lsdir       `ls -l` of one directory of 10,000 empty files: cold (after
              dropping caches) and warm (right after) (seconds)

seqread, randread and randwrite need the file of seqwrite: it is always
written first, and reported only when seqwrite is selected.

Dropping caches (`sync; echo 3 > /proc/sys/vm/drop_caches`) needs root.
Without it the benchmark says so, goes on, and marks the "cold" figures as
warm. Dropping the kernel caches does not empty the file system daemon's own
caches (dfsfuse's shard and metadata caches stay warm): those figures are
reported as they are.

Output: progress on stderr; on stdout the table, then the JSON (or the JSON
goes to --json FILE). Everything the benchmark creates, on both sides, is
removed at the end, also after an error or Ctrl-C. Exit status: 0, 1 when a
workload or the clean-up failed (the table says which), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

MiB = 1024 * 1024
MB = 1000 * 1000
BLOCK = 4096
SMALL_FILES = 5000
SMALL_DIRS = 50
LS_FILES = 10000
WORKLOADS = ("seqwrite", "seqread", "randread", "randwrite", "smallfiles", "srctree", "lsdir")
BIGFILE_WORKLOADS = ("seqwrite", "seqread", "randread", "randwrite")
SCRATCH_PARENT = "/var/tmp"
SEED = 20240601


class BenchError(Exception):
    """A workload could not run to the end (a failed call, a wrong result)."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    """One row of the table: a workload's figure on the mount and on the local disk."""

    id: str                     # "seqwrite", "smallfiles.create", ...
    workload: str               # the label shown in the table
    unit: str                   # "MB/s", "IOPS", "files/s", "ops/s", "s"
    better: str                 # "higher" or "lower"
    cold: bool | None = None    # None: not a cold figure; False: caches could not be dropped
    mount: float | None = None
    local: float | None = None
    errors: dict[str, str] = field(default_factory=dict)   # side -> message

    @property
    def ratio(self) -> float | None:
        if self.mount is None or self.local is None or self.local == 0:
            return None
        return self.mount / self.local


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "error"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_ratio(figure: Figure) -> str:
    ratio = figure.ratio
    if ratio is None:
        return "-"
    shown = f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"   # 0.00019x, not 0.00x
    if figure.better == "higher":
        return f"{shown}x"
    return f"{shown}x slower" if ratio >= 1 else f"{shown}x (faster)"


def print_table(figures: list[Figure], out: TextIO) -> None:
    header = ("workload", "unit", "mount", "local", "mount/local")
    rows = [header]
    for figure in figures:
        label = figure.workload + (" [warm!]" if figure.cold is False else "")
        rows.append((label, figure.unit, format_value(figure.mount, figure.unit),
                     format_value(figure.local, figure.unit), format_ratio(figure)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[i].rjust(widths[i]) for i in (2, 3)]
        cells.append(row[4].ljust(widths[4]))
        print("  ".join(cells).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    print("mount/local: for rates (MB/s, IOPS, /s) higher is better; for times (s) lower is better,"
          " shown as 'x slower'.", file=out)
    if any(figure.cold is False for figure in figures):
        print("[warm!]: caches could not be dropped (needs root), so this 'cold' figure is warm.", file=out)
    for figure in figures:
        for side, message in figure.errors.items():
            print(f"error: {figure.workload} on {side}: {message}", file=out)


# --------------------------------------------------------------------------
# Caches


class Caches:
    """Drops the kernel's page, dentry and inode caches, or says once why it cannot."""

    def __init__(self) -> None:
        self.possible = True
        self.reason = ""
        if os.geteuid() != 0:
            self.possible = False
            progress("warning: not root, so caches cannot be dropped: the 'cold' figures will be warm")

    def drop(self) -> bool:
        """Return True when the caches were dropped."""
        if self.possible:
            os.sync()
            try:
                with open("/proc/sys/vm/drop_caches", "w") as control:
                    control.write("3\n")
                return True
            except OSError as error:
                self.possible = False
                self.reason = f"cannot write /proc/sys/vm/drop_caches: {error.strerror}"
        if self.reason:
            progress(f"warning: cannot drop caches ({self.reason}); the 'cold' figures will be warm")
            self.reason = ""   # say it once
        return False


# --------------------------------------------------------------------------
# Helpers


def elapsed_since(start: float) -> float:
    return max(time.perf_counter() - start, 1e-9)


def random_data(size: int) -> memoryview:
    """Incompressible data to write; slices of it avoid one os.urandom call per write."""
    return memoryview(os.urandom(size))


def run_command(argv: list[str]) -> float:
    """Run a command to completion; return its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "LC_ALL": "C"})
    seconds = elapsed_since(start)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[0] if lines else "no message"
        raise BenchError(f"{' '.join(argv[:2])} exited {done.returncode}: {detail}")
    return seconds


def remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def filesystem_of(path: str) -> str:
    """The file system type holding path, from /proc/self/mountinfo ("?" if unknown)."""
    real = os.path.realpath(path)
    best, best_type = "", "?"
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                left, _, right = line.partition(" - ")
                point = left.split()[4].encode().decode("unicode_escape")
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                    best, best_type = point, right.split()[0]
    except (OSError, IndexError):
        pass
    return best_type


# --------------------------------------------------------------------------
# Workloads. Each runs in a fresh directory on one side and returns its figures.


@dataclass
class Settings:
    size_mib: int
    seconds: float
    selected: tuple[str, ...]
    source: Path | None = None    # the staged source tree, for srctree


def bigfile(directory: Path, settings: Settings, caches: Caches) -> dict[str, tuple[float, bool | None]]:
    """seqwrite, then seqread, randread, randwrite on the same file."""
    figures: dict[str, tuple[float, bool | None]] = {}
    path = directory / "big"
    size = settings.size_mib * MiB
    data = random_data(8 * MiB)

    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(settings.size_mib):
            chunk = data[(i % 8) * MiB:(i % 8 + 1) * MiB]
            if os.write(fd, chunk) != MiB:
                raise BenchError("short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    figures["seqwrite"] = (size / MB / elapsed_since(start), None)

    if "seqread" in settings.selected:
        cold = caches.drop()
        buffer = bytearray(MiB)
        total = 0
        start = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [buffer])
                if n == 0:
                    break
                total += n
        finally:
            os.close(fd)
        seconds = elapsed_since(start)
        if total != size:
            raise BenchError(f"read {total} bytes of a {size}-byte file")
        figures["seqread"] = (total / MB / seconds, cold)

    blocks = size // BLOCK
    if "randread" in settings.selected:
        cold = caches.drop()
        rng = random.Random(SEED)
        ops = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            start = time.perf_counter()
            deadline = start + settings.seconds
            while time.perf_counter() < deadline:
                if len(os.pread(fd, BLOCK, rng.randrange(blocks) * BLOCK)) != BLOCK:
                    raise BenchError("short read")
                ops += 1
            seconds = elapsed_since(start)
        finally:
            os.close(fd)
        figures["randread"] = (ops / seconds, cold)

    if "randwrite" in settings.selected:
        rng = random.Random(SEED + 1)
        ops = 0
        fd = os.open(path, os.O_WRONLY)
        try:
            start = time.perf_counter()
            deadline = start + settings.seconds
            while time.perf_counter() < deadline:
                at = (ops % 2048) * BLOCK
                if os.pwrite(fd, data[at:at + BLOCK], rng.randrange(blocks) * BLOCK) != BLOCK:
                    raise BenchError("short write")
                ops += 1
            os.fsync(fd)
            seconds = elapsed_since(start)
        finally:
            os.close(fd)
        figures["randwrite"] = (ops / seconds, None)
    return figures


def smallfiles(directory: Path, settings: Settings, caches: Caches) -> dict[str, tuple[float, bool | None]]:
    """Create, stat, cold read and delete 5,000 files of 4 KiB in 50 directories."""
    data = bytes(random_data(BLOCK))
    dirs = [directory / f"d{d:02d}" for d in range(SMALL_DIRS)]
    files = [str(d / f"f{f:04d}") for d in dirs for f in range(SMALL_FILES // SMALL_DIRS)]
    figures: dict[str, tuple[float, bool | None]] = {}

    start = time.perf_counter()
    for d in dirs:
        os.mkdir(d)
    for name in files:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            if os.write(fd, data) != BLOCK:
                raise BenchError("short write")
        finally:
            os.close(fd)
    figures["create"] = (len(files) / elapsed_since(start), None)

    start = time.perf_counter()
    for name in files:
        if os.stat(name).st_size != BLOCK:
            raise BenchError(f"{name}: wrong size after create")
    figures["stat"] = (len(files) / elapsed_since(start), None)

    cold = caches.drop()
    start = time.perf_counter()
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            if len(os.read(fd, 2 * BLOCK)) != BLOCK:
                raise BenchError(f"{name}: short read")
        finally:
            os.close(fd)
    figures["read"] = (len(files) / elapsed_since(start), cold)

    start = time.perf_counter()
    for name in files:
        os.unlink(name)
    for d in dirs:
        os.rmdir(d)
    figures["delete"] = (len(files) / elapsed_since(start), None)
    return figures


def srctree(directory: Path, settings: Settings, caches: Caches) -> dict[str, tuple[float, bool | None]]:
    """cp -a, diff -r, rm -rf of the staged source tree."""
    assert settings.source is not None
    copy = directory / "tree"
    figures: dict[str, tuple[float, bool | None]] = {}
    figures["cp"] = (run_command(["cp", "-a", str(settings.source), str(copy)]), None)
    figures["diff"] = (run_command(["diff", "-r", str(settings.source), str(copy)]), None)
    figures["rm"] = (run_command(["rm", "-rf", str(copy)]), None)
    if copy.exists():
        raise BenchError("rm -rf left the tree behind")
    return figures


def lsdir(directory: Path, settings: Settings, caches: Caches) -> dict[str, tuple[float, bool | None]]:
    """ls -l of a directory of 10,000 files, cold then warm."""
    big = directory / "many"
    os.mkdir(big)
    for i in range(LS_FILES):
        os.close(os.open(big / f"file{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    figures: dict[str, tuple[float, bool | None]] = {}
    for which in ("cold", "warm"):
        cold = caches.drop() if which == "cold" else None
        start = time.perf_counter()
        done = subprocess.run(["ls", "-l", str(big)], check=False, capture_output=True,
                              env={**os.environ, "LC_ALL": "C"})
        seconds = elapsed_since(start)
        lines = done.stdout.count(b"\n")
        if done.returncode != 0 or lines != LS_FILES + 1:
            raise BenchError(f"ls -l exited {done.returncode} with {lines} lines: "
                             f"{done.stderr.decode(errors='replace').strip()[:200]}")
        figures[which] = (seconds, cold)
    return figures


# --------------------------------------------------------------------------
# The run


@dataclass
class Group:
    """Workloads that share one fresh directory and one function."""

    name: str
    run: Callable[[Path, Settings, Caches], dict[str, tuple[float, bool | None]]]
    rows: list[tuple[str, str, str, str, str]]   # (key in run's result, figure id, label, unit, better)


def build_groups(settings: Settings) -> list[Group]:
    size = f"{settings.size_mib / 1024:g} GiB" if settings.size_mib % 1024 == 0 else f"{settings.size_mib} MiB"
    secs = f"{settings.seconds:g} s"
    return [
        Group("bigfile", bigfile, [
            ("seqwrite", "seqwrite", f"seq write {size} + fsync", "MB/s", "higher"),
            ("seqread", "seqread", f"seq read {size}, cold", "MB/s", "higher"),
            ("randread", "randread", f"random 4 KiB read, {secs}, cold start", "IOPS", "higher"),
            ("randwrite", "randwrite", f"random 4 KiB write, {secs} + fsync", "IOPS", "higher"),
        ]),
        Group("smallfiles", smallfiles, [
            ("create", "smallfiles.create", "create 5,000 x 4 KiB files", "files/s", "higher"),
            ("stat", "smallfiles.stat", "stat 5,000 files", "ops/s", "higher"),
            ("read", "smallfiles.read", "read 5,000 files, cold", "files/s", "higher"),
            ("delete", "smallfiles.delete", "delete 5,000 files", "ops/s", "higher"),
        ]),
        Group("srctree", srctree, [
            ("cp", "srctree.cp", "cp -a stdlib tree", "s", "lower"),
            ("diff", "srctree.diff", "diff -r stdlib tree", "s", "lower"),
            ("rm", "srctree.rm", "rm -rf stdlib tree", "s", "lower"),
        ]),
        Group("lsdir", lsdir, [
            ("cold", "lsdir.cold", "ls -l 10,000 files, cold", "s", "lower"),
            ("warm", "lsdir.warm", "ls -l 10,000 files, warm", "s", "lower"),
        ]),
    ]


def wanted_rows(group: Group, selected: tuple[str, ...]) -> list[tuple[str, str, str, str, str]]:
    if group.name == "bigfile":
        return [row for row in group.rows if row[0] in selected]
    return group.rows if group.name in selected else []


# Directories of the stdlib left out of the source tree: installed packages
# and bytecode anywhere; at the top, the regression test suite (test/) and
# config-3.*/ (a static libpython of tens of MB). What is left is close to the
# issue's "~1,400 files, ~50 MB" (1,102 files and 33 MB for Python 3.11).
EXCLUDED_ANYWHERE = ("site-packages", "__pycache__")
EXCLUDED_AT_TOP = ("test", "config-*")


def source_filter(stdlib: Path) -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's ignore for the stdlib at `stdlib`: the excluded
    directories (files such as idlelib/config-main.def stay)."""
    def excluded(directory: str, names: list[str]) -> set[str]:
        patterns = EXCLUDED_ANYWHERE + (EXCLUDED_AT_TOP if Path(directory) == stdlib else ())
        return {name for name in names
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
                and os.path.isdir(os.path.join(directory, name))}
    return excluded


def stage_source(scratch: Path) -> tuple[Path, dict[str, object]]:
    """Copy the stdlib without the excluded directories to the scratch dir."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    staged = scratch / "stdlib"
    excluded = [*EXCLUDED_ANYWHERE, *(f"{stdlib.name}/{name}" for name in EXCLUDED_AT_TOP)]
    progress(f"staging the source tree {stdlib} (without {', '.join(excluded)}) in {staged}")
    shutil.copytree(stdlib, staged, symlinks=True, ignore=source_filter(stdlib))
    files = dirs = size = 0
    for root, dirnames, filenames in os.walk(staged):
        dirs += len(dirnames)
        for name in filenames:
            st = os.lstat(os.path.join(root, name))
            files += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    info = {"path": str(stdlib), "excluded": excluded,
            "files": files, "directories": dirs, "bytes": size}
    progress(f"source tree: {files:,} files, {dirs:,} directories, {size / MB:,.1f} MB")
    return staged, info


def run_benchmark(args: argparse.Namespace) -> int:
    began = time.time()
    settings = Settings(size_mib=args.size_mib, seconds=args.seconds, selected=args.only)
    caches = Caches()
    scratch_parent = SCRATCH_PARENT if os.path.isdir(SCRATCH_PARENT) else tempfile.gettempdir()
    created: list[Path] = []
    figures: list[Figure] = []
    failed = False
    report: dict[str, object] = {}
    try:
        try:
            mount_root = Path(tempfile.mkdtemp(prefix="fsbench-", dir=args.mountpoint))
            created.append(mount_root)
            scratch = Path(tempfile.mkdtemp(prefix="fsbench-", dir=scratch_parent))
            created.append(scratch)
            if args.baseline is None:
                local_root = scratch / "local"
                local_root.mkdir()
            else:
                local_root = Path(tempfile.mkdtemp(prefix="fsbench-", dir=args.baseline))
                created.append(local_root)
        except OSError as error:
            print(f"fsbench: cannot create a working directory: {error}", file=sys.stderr)
            return 1
        if os.stat(mount_root).st_dev == os.stat(local_root).st_dev:
            progress(f"warning: {args.mountpoint} and the baseline {local_root} are on the same file system")
        sides = {"mount": mount_root, "local": local_root}
        report = {
            "mount": {"path": os.path.realpath(args.mountpoint), "fstype": filesystem_of(args.mountpoint)},
            "local": {"path": str(local_root), "fstype": filesystem_of(str(local_root))},
            "size_mib": settings.size_mib, "seconds": settings.seconds,
            "workloads": list(settings.selected), "caches_dropped": caches.possible,
        }
        progress(f"mount: {report['mount']}  local: {report['local']}")
        if "srctree" in settings.selected:
            try:
                settings.source, report["source_tree"] = stage_source(scratch)
            except OSError as error:
                progress(f"error: cannot stage the source tree: {error}")
                settings.selected = tuple(name for name in settings.selected if name != "srctree")
                failed = True

        for group in build_groups(settings):
            rows = wanted_rows(group, settings.selected)
            if not rows:
                continue
            group_figures = [Figure(fid, label, unit, better) for _, fid, label, unit, better in rows]
            figures.extend(group_figures)
            for side, root in sides.items():
                directory = root / group.name
                progress(f"[{side}] {group.name} in {directory} ...")
                try:
                    directory.mkdir()
                    results = group.run(directory, settings, caches)
                    for (key, _, _, _, _), figure in zip(rows, group_figures):
                        value, cold = results[key]
                        setattr(figure, side, value)
                        if cold is not None:
                            figure.cold = cold if figure.cold is None else figure.cold and cold
                        progress(f"[{side}]   {figure.workload}: {format_value(value, figure.unit)} {figure.unit}")
                except (OSError, BenchError) as error:
                    failed = True
                    progress(f"[{side}]   {group.name} failed: {error}")
                    for figure in group_figures:
                        if getattr(figure, side) is None:
                            figure.errors[side] = str(error)
                finally:
                    try:
                        remove_tree(directory)
                    except OSError as error:
                        failed = True
                        progress(f"[{side}]   cannot remove {directory}: {error}")
    finally:
        for path in reversed(created):
            try:
                remove_tree(path)
            except OSError as error:
                failed = True
                print(f"fsbench: cannot remove {path}: {error}", file=sys.stderr)

    duration = time.time() - began
    report["caches_dropped"] = caches.possible
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(began))
    report["duration_s"] = round(duration, 1)
    report["results"] = [
        {**{k: v for k, v in asdict(figure).items() if k != "errors"},
         "ratio": figure.ratio, "errors": figure.errors or None}
        for figure in figures
    ]
    print_table(figures, sys.stdout)
    print(f"run took {duration:.0f} s", file=sys.stdout)
    text = json.dumps(report, indent=2)
    if args.json:
        try:
            Path(args.json).write_text(text + "\n")
            progress(f"JSON written to {args.json}")
        except OSError as error:
            print(f"fsbench: cannot write {args.json}: {error}", file=sys.stderr)
            print(text)
            return 1
    else:
        print(text)
    return 1 if failed else 0


# --------------------------------------------------------------------------
# Command line


def positive(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def workload_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload {', '.join(unknown) or text!r}; "
                                         f"choose from {','.join(WORKLOADS)}")
    return tuple(name for name in WORKLOADS if name in names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsbench", description="Run the dfsfuse benchmark workloads on a mount and on the local disk.")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a mounted file system to measure")
    parser.add_argument("--baseline", metavar="DIR",
                        help=f"a directory on the local disk to compare with (default: a fresh temporary "
                             f"directory under {SCRATCH_PARENT}, removed afterwards)")
    parser.add_argument("--json", metavar="FILE", help="write the JSON to FILE instead of stdout")
    parser.add_argument("--only", metavar="NAMES", type=workload_list, default=WORKLOADS,
                        help=f"comma-separated workloads among {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--size-mib", metavar="N", type=positive(int), default=1024,
                        help="size of the big file in MiB (default 1024)")
    parser.add_argument("--seconds", metavar="S", type=positive(float), default=20.0,
                        help="duration of each random I/O workload (default 20)")
    return parser


def check_directory(parser: argparse.ArgumentParser, what: str, path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        parser.exit(2, f"fsbench: {what} {path}: {error.strerror}\n")
    if not stat.S_ISDIR(mode):
        parser.exit(2, f"fsbench: {what} {path} is not a directory\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_directory(parser, "MOUNTPOINT", args.mountpoint)
    if args.baseline is not None:
        check_directory(parser, "baseline", args.baseline)
    if not os.path.ismount(args.mountpoint):
        progress(f"warning: {args.mountpoint} is not a mount point; measuring the directory as it is")
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)   # clean up on kill too, as on Ctrl-C
    try:
        return run_benchmark(args)
    except KeyboardInterrupt:
        print("fsbench: interrupted (everything created was removed)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
