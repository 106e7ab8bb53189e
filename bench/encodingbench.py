#!/usr/bin/env python3
"""encodingbench: what each way of storing data costs, against plain R = 2 and the local disk.

    python bench/encodingbench.py [--size-mib N] [--scratch DIR] [--only NAMES] [--json FILE]

Each variant is a file system of its own, with six local node stores in a
scratch directory on the local disk and R = 2, mounted with mount.py:

  plain      R = 2 replicas of every shard: the reference
  zstd       user.dfs.compression zstd on the root (inherited by every file)
  lz4        user.dfs.compression lz4
  ec4+2      user.dfs.ec 4+2: four data and two parity fragments on six nodes
  encrypted  `dfsfuse format --encrypt --key-file` (every object sealed)

Two data sets of --size-mib MiB (default 256) each: "text", the Python
standard library's sources concatenated and repeated (zstd shrinks it about
5x), and "random" (incompressible). For each variant and data set:

  write MB/s    one file of the data set written in 1 MiB writes, then fsync
  read MB/s     after an unmount and a mount (which empties dfsfuse's caches)
                and dropping the kernel's caches, the file read in 1 MiB reads
  stored        bytes on the node stores per byte of file (status --json's
                node_bytes over logical_bytes, read while unmounted)
  repair s      with the file system unmounted, one node store of the six is
                emptied (every replica and fragment on it lost) and
                `dfsfuse repair` remakes them; its wall time

The local disk writes and reads the same data in the same run (same fsync,
same cache drop): MB/s figures are shown as ratios against it, and every
variant's figures as ratios against plain R = 2's. Absolute figures drift on
shared machines; compare the ratios between runs.

Needs root (FUSE, dropping caches). Everything it makes is removed at the
end, also after an error or Ctrl-C. Output: the table on stdout, then the
JSON (or into --json FILE). Exit status 0, 1 if a variant failed (the table
says which), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MiB = 1024 * 1024
MB = 1000 * 1000
NODES = 6
KEY_PASSPHRASE = b"encodingbench passphrase, not a secret\n"
DATA_SETS = ("text", "random")


@dataclass(frozen=True)
class Variant:
    name: str
    xattrs: tuple[tuple[str, str], ...] = ()  # set on the root once mounted
    encrypted: bool = False


VARIANTS = (
    Variant("plain"),
    Variant("zstd", (("user.dfs.compression", "zstd"),)),
    Variant("lz4", (("user.dfs.compression", "lz4"),)),
    Variant("ec4+2", (("user.dfs.ec", "4+2"),)),
    Variant("encrypted", encrypted=True),
)


class BenchError(Exception):
    """A step failed; the message says which and why."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Result:
    variant: str
    data: str
    write_mbs: float | None = None
    read_mbs: float | None = None
    stored_per_logical: float | None = None
    repair_seconds: float | None = None
    error: str | None = None


@dataclass
class Report:
    size_mib: int
    local: dict[str, dict[str, float]] = field(default_factory=dict)  # data set -> {"write_mbs", "read_mbs"}
    results: list[Result] = field(default_factory=list)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def make_data_sets(directory: Path, size: int) -> dict[str, Path]:
    """The text and random data sets as files on the local disk."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = bytearray()
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" not in path.parts:
            sources += path.read_bytes()
        if len(sources) >= 64 * MiB:
            break
    text = directory / "text"
    with open(text, "wb") as out:
        written = 0
        while written < size:
            chunk = sources[: size - written]
            out.write(chunk)
            written += len(chunk)
    noise = directory / "random"
    with open(noise, "wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
    return {"text": text, "random": noise}


def timed_write(source: Path, target: Path) -> float:
    """Copy source to target in 1 MiB writes, fsync; MB/s."""
    started = time.perf_counter()
    with open(source, "rb") as src, open(target, "wb", buffering=0) as out:
        while chunk := src.read(MiB):
            out.write(chunk)
        os.fsync(out.fileno())
    return source.stat().st_size / MB / (time.perf_counter() - started)


def timed_read(path: Path) -> float:
    """Read the file in 1 MiB reads (caches dropped first); MB/s."""
    drop_caches()
    started = time.perf_counter()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(MiB):
            size += len(chunk)
    return size / MB / (time.perf_counter() - started)


class FileSystem:
    """One variant's file system: data dir, six node stores, mount point."""

    def __init__(self, root: Path, variant: Variant):
        self.root = root
        self.variant = variant
        self.data_dir = root / "data"
        self.mountpoint = root / "mnt"
        self.key_file = root / "key"
        self.config = root / "config.toml"
        self.pid: int | None = None
        self.mountpoint.mkdir(parents=True)
        nodes = "".join(f'[[nodes]]\nname = "n{n}"\npath = "{root / f"n{n}"}"\n' for n in range(NODES))
        self.config.write_text("replicas = 2\ntrash_days = 0\n" + nodes)

    def cli(self, *args: str) -> str:
        done = subprocess.run([PYTHON, "-m", "dfsfuse", *args, "--data-dir", str(self.data_dir),
                               "--config", str(self.config)], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"dfsfuse {args[0]}: {(done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]}")
        return done.stdout

    def create(self) -> None:
        if self.variant.encrypted:
            self.key_file.write_bytes(KEY_PASSPHRASE)
            self.key_file.chmod(0o600)
            self.cli("format", "--encrypt", "--key-file", str(self.key_file))

    def mount(self) -> None:
        command = [PYTHON, str(REPO / "mount.py"), str(self.mountpoint), "--data-dir", str(self.data_dir),
                   "--config", str(self.config)]
        if self.variant.encrypted:
            command += ["--key-file", str(self.key_file)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"mount: {done.stderr.strip()}")
        self.pid = int((self.data_dir / "lock").read_text().split()[0])

    def unmount(self) -> None:
        if self.pid is None:
            return
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True)
        deadline = time.monotonic() + 120
        while _alive(self.pid):
            if time.monotonic() > deadline:
                raise BenchError(f"mount {self.pid} did not exit after the unmount")
            time.sleep(0.1)
        self.pid = None

    def discard(self) -> None:
        """Leave nothing behind: lazy unmount, end our daemon by PID, remove the tree."""
        if self.pid is not None:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False, capture_output=True)
            if _alive(self.pid):
                os.kill(self.pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)

    def stored_per_logical(self) -> float:
        report = json.loads(self.cli("status", "--json"))
        return report["node_bytes"] / max(1, report["logical_bytes"])

    def lose_one_node(self) -> None:
        """Empty node store n0 but for its identity file: every replica on it is lost."""
        store = self.root / "n0"
        for child in store.iterdir():
            if child.name != "STORE":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def measure_variant(scratch: Path, variant: Variant, data: dict[str, Path]) -> list[Result]:
    results = []
    for name, source in data.items():
        result = Result(variant.name, name)
        results.append(result)
        fs = FileSystem(Path(tempfile.mkdtemp(prefix=f"{variant.name}-{name}-", dir=scratch)), variant)
        try:
            progress(f"{variant.name} / {name}: write")
            fs.create()
            fs.mount()
            for attribute, value in variant.xattrs:
                os.setxattr(fs.mountpoint, attribute, value.encode())
            result.write_mbs = timed_write(source, fs.mountpoint / name)
            fs.unmount()
            progress(f"{variant.name} / {name}: read")
            fs.mount()
            result.read_mbs = timed_read(fs.mountpoint / name)
            fs.unmount()
            result.stored_per_logical = fs.stored_per_logical()
            progress(f"{variant.name} / {name}: repair")
            fs.lose_one_node()
            started = time.perf_counter()
            said = fs.cli("repair")
            result.repair_seconds = time.perf_counter() - started
            if not re.search(r"repaired [1-9]", said) or ", 0 unrecoverable" not in said:
                raise BenchError(f"repair did not remake what node n0 lost: {said.strip()}")
        except (BenchError, OSError) as error:
            result.error = str(error)
            progress(f"{variant.name} / {name}: failed: {error}")
        finally:
            fs.discard()
    return results


def measure_local(scratch: Path, data: dict[str, Path]) -> dict[str, dict[str, float]]:
    figures = {}
    for name, source in data.items():
        target = scratch / f"local-{name}"
        try:
            figures[name] = {"write_mbs": timed_write(source, target), "read_mbs": timed_read(target)}
        finally:
            target.unlink(missing_ok=True)
    return figures


def render(report: Report) -> list[str]:
    plain = {result.data: result for result in report.results if result.variant == "plain"}
    header = ["variant", "data", "write MB/s", "x local", "read MB/s", "x local", "stored/logical",
              "repair s", "x plain"]
    rows = [header]
    for result in report.results:
        local = report.local.get(result.data, {})
        reference = plain.get(result.data)
        rows.append([
            result.variant, result.data,
            _value(result.write_mbs), _ratio(result.write_mbs, local.get("write_mbs")),
            _value(result.read_mbs), _ratio(result.read_mbs, local.get("read_mbs")),
            _value(result.stored_per_logical, 2),
            _value(result.repair_seconds, 2),
            _ratio(result.repair_seconds, reference.repair_seconds if reference else None),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i > 1 else cell.ljust(width) for i, (cell, width)
                       in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"local disk, {name}: write {figures['write_mbs']:.0f} MB/s, read {figures['read_mbs']:.0f} MB/s"
              for name, figures in report.local.items()]
    lines += [f"error: {result.variant} / {result.data}: {result.error}" for result in report.results if result.error]
    return lines


def _value(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="size of each data set (default 256)")
    parser.add_argument("--scratch", default="/var/tmp", help="where the file systems go (default /var/tmp)")
    parser.add_argument("--only", help="comma-separated variants: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--json", metavar="FILE", help="write the JSON there instead of stdout")
    args = parser.parse_args(argv)
    wanted = args.only.split(",") if args.only else [variant.name for variant in VARIANTS]
    unknown = set(wanted) - {variant.name for variant in VARIANTS}
    if unknown or args.size_mib < 1:
        parser.error(f"unknown variant {', '.join(sorted(unknown))}" if unknown else "--size-mib must be positive")
    if os.geteuid() != 0:
        parser.error("needs root (FUSE mounts, dropping caches)")
    scratch = Path(tempfile.mkdtemp(prefix="encodingbench-", dir=args.scratch))
    report = Report(args.size_mib)
    try:
        progress(f"making two data sets of {args.size_mib} MiB in {scratch}")
        data = make_data_sets(scratch, args.size_mib * MiB)
        report.local = measure_local(scratch, data)
        for variant in VARIANTS:
            if variant.name in wanted:
                report.results += measure_variant(scratch, variant, data)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(render(report)))
    output = json.dumps(asdict(report), indent=2)
    if args.json:
        Path(args.json).write_text(output + "\n")
    else:
        print(output)
    return 1 if any(result.error for result in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
