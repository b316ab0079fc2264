"""Real applications for tierbench: Debian's packages, started as their users start them.

Each application's server runs pinned to the workload's vCPU (the judge
counts its accesses only); its client runs beside the harness. `load()`
fills the server with more data than the fast node has room for beside the
ballast; `serve()` then drives a skewed read load the application did not
choose for us and returns the client's own throughput.

- redis: redis-server; redis-benchmark SETs ~1 KiB values in random key
  order, then GETs a key subset (so the hot keys are scattered through the
  heap).
- memcached: memcached; memcaslap (libmemcached-tools) loads a large set of
  ~1 KiB items, then a smaller window of keys gets 9:1 gets to sets (the hot
  items are the newest, where the allocator put them).
- pgbench: PostgreSQL 15 initialized into the guest's tmpfs (its shared
  buffers are MAP_SHARED memory of every backend); pgbench reads accounts
  with a Zipf skew, scattered over the table by pgbench's permute().
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

import access

SCRATCH = Path("/tmp/tierbench-apps")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class AppError(RuntimeError):
    """An application did not start or its client failed."""


def run(cmd: list[str], timeout: float = 3600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AppError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def wait_for(ready: object, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AppError(f"{what} did not become ready in {timeout:.0f} s")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class App(ABC):
    """A server process and the client that loads and drives it."""

    name = ""
    unit = "ops/s"

    def __init__(self) -> None:
        self.server: subprocess.Popen[bytes] | None = None

    def launch(self, cmd: list[str]) -> None:
        SCRATCH.mkdir(parents=True, exist_ok=True)
        log = open(SCRATCH / f"{self.name}.log", "wb")  # noqa: SIM115 (the server keeps it)
        self.server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                       preexec_fn=access.pin_workload)

    def pids(self) -> list[int]:
        """The server's processes (a forking server's children too)."""
        if self.server is None:
            return []
        found = [self.server.pid]
        for pid in found:
            children = Path(f"/proc/{pid}/task/{pid}/children")
            if children.exists():
                found += [int(c) for c in children.read_text().split()]
        return found

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(120)

    @abstractmethod
    def start(self) -> None:
        """Start the server; return once it answers."""

    @abstractmethod
    def load(self) -> None:
        """Fill the server with its data set."""

    @abstractmethod
    def serve(self, seconds: float) -> float:
        """Drive the read load for `seconds`; the client's throughput in self.unit."""


class Redis(App):
    name = "redis"
    unit = "GET/s"
    PORT = 6379
    KEYS = 131072  # keyspace of the load: about 170 MiB of 1 KiB values
    HOT_KEYS = 16384  # the read subset: keys 0..HOT_KEYS-1, wherever they landed
    VALUE = 1024
    BATCH = 20000  # GETs per redis-benchmark run inside serve()

    def start(self) -> None:
        self.launch(["redis-server", "--port", str(self.PORT), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(SCRATCH)])
        wait_for(lambda: port_open(self.PORT), "redis-server")

    def bench(self, test: str, requests: int, keys: int, pipeline: int) -> float:
        out = run(["redis-benchmark", "-p", str(self.PORT), "-t", test, "-n", str(requests),
                   "-r", str(keys), "-d", str(self.VALUE), "-P", str(pipeline), "-c", "8",
                   "--csv"])
        for line in out.splitlines():
            fields = [f.strip('"') for f in line.split(",")]
            if fields[0] == test.upper():
                return float(fields[1])
        raise AppError(f"redis-benchmark printed no {test.upper()} rate: {out[-300:]}")

    def load(self) -> None:
        # Twice the keyspace in random order sets about 86% of the keys.
        self.bench("set", 2 * self.KEYS, self.KEYS, pipeline=32)

    def serve(self, seconds: float) -> float:
        busy = 0.0
        requests = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rate = self.bench("get", self.BATCH, self.HOT_KEYS, pipeline=16)
            busy += self.BATCH / rate
            requests += self.BATCH
        return requests / busy


class Memcached(App):
    name = "memcached"
    unit = "TPS"
    PORT = 11211
    VALUE = 1024
    # memcaslap's keys: concurrency x window; the load's 128 Ki items are
    # about 150 MiB, the served window 16 Ki items.
    LOAD_CONCURRENCY, LOAD_WINDOW = 16, "8k"
    SERVE_CONCURRENCY, SERVE_WINDOW = 4, "4k"
    SET_ONLY = "key\n16 16 1\nvalue\n1024 1024 1\ncmd\n0 1\n"

    def start(self) -> None:
        self.launch(["memcached", "-u", "nobody", "-l", "127.0.0.1", "-p", str(self.PORT),
                     "-U", "0", "-m", "1024", "-t", "1"])
        wait_for(lambda: port_open(self.PORT), "memcached")

    def slap(self, *options: str) -> float:
        out = run(["memcaslap", "-s", f"127.0.0.1:{self.PORT}", "-T", "1",
                   "-X", str(self.VALUE), *options])
        rates = re.findall(r"TPS:\s*(\d+)", out)
        if not rates:
            raise AppError(f"memcaslap printed no TPS: {out[-300:]}")
        return float(rates[-1])

    def load(self) -> None:
        config = SCRATCH / "memcaslap-set.cfg"
        config.write_text(self.SET_ONLY)
        window = int(self.LOAD_WINDOW.rstrip("k")) * 1024
        self.slap("-F", str(config), "-c", str(self.LOAD_CONCURRENCY), "-w", self.LOAD_WINDOW,
                  "-x", str(self.LOAD_CONCURRENCY * window))

    def serve(self, seconds: float) -> float:
        return self.slap("-c", str(self.SERVE_CONCURRENCY), "-w", self.SERVE_WINDOW,
                         "-t", f"{max(1, int(seconds))}s")


class Pgbench(App):
    name = "pgbench"
    unit = "TPS"
    SCALE = 8  # 800,000 accounts: about 130 MiB of table and index
    SHARED_BUFFERS = "256MB"
    DATA = Path("/tmp/tierbench-pg")
    # Zipf-skewed account reads, scattered over the table (pgbench's permute()).
    SCRIPT = ("\\set r random_zipfian(0, 100000 * :scale - 1, 1.1)\n"
              "\\set aid 1 + permute(:r, 100000 * :scale)\n"
              "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n")

    def as_postgres(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd]

    def start(self) -> None:
        run(["rm", "-rf", str(self.DATA)])
        run(self.as_postgres(str(PG_BIN / "initdb"), "-D", str(self.DATA), "-A", "trust"))
        self.launch(self.as_postgres(
            str(PG_BIN / "postgres"), "-D", str(self.DATA), "-k", "/tmp",
            "-c", "listen_addresses=", "-c", f"shared_buffers={self.SHARED_BUFFERS}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "checkpoint_timeout=1h", "-c", "max_wal_size=4GB"))
        wait_for(lambda: subprocess.run([str(PG_BIN / "pg_isready"), "-h", "/tmp", "-q"],
                                        check=False).returncode == 0, "postgres")

    def pgbench(self, *options: str) -> str:
        return run(self.as_postgres(str(PG_BIN / "pgbench"), "-h", "/tmp", *options, "postgres"))

    def load(self) -> None:
        self.pgbench("-i", "-q", "-s", str(self.SCALE))
        # Read every account once so the table sits in the shared buffers.
        run(self.as_postgres(str(PG_BIN / "psql"), "-h", "/tmp", "-q", "-c",
                             "SELECT sum(abalance) FROM pgbench_accounts", "postgres"))

    def serve(self, seconds: float) -> float:
        script = SCRATCH / "zipf-read.sql"
        script.write_text(self.SCRIPT)
        script.chmod(0o644)
        out = self.pgbench("-n", "-f", str(script), "-c", "4", "-j", "1",
                           "-T", str(max(1, int(seconds))))
        match = re.search(r"tps = ([\d.]+)", out)
        if not match:
            raise AppError(f"pgbench printed no tps: {out[-300:]}")
        return float(match[1])

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            run(self.as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.DATA), "stop",
                                 "-m", "fast"))
            self.server.wait(120)
        run(["rm", "-rf", str(self.DATA)])


APPS: dict[str, type[App]] = {"redis": Redis, "memcached": Memcached, "pgbench": Pgbench}
