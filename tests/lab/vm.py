#!/usr/bin/env python3
"""The two-tier lab: boot a 6.12 kernel under QEMU with a slow CPU-less node.

Node 0 holds both CPUs and "DRAM"; node 1 is CPU-less memory that ACPI HMAT
describes with 3x the latency and 1/4 the bandwidth, so the guest kernel puts
it in a lower memory tier (a CXL expander, as far as Linux can tell).

The guest's root is the host's root, read-only over virtio-9p under a tmpfs
overlay: the checkout, its virtualenv and every installed package are there
at the same paths, and nothing the guest writes reaches the host except
through the results share (/lab-out in the guest).

    python3 tests/lab/vm.py run [--kernel tierd|stock] -- COMMAND...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent.parent
CACHE = Path(os.environ.get("TIERD_LAB_CACHE", "/var/cache/tierd-lab"))
KERNELS = ("stock", "tierd", "debug")
# What `make kernels` builds (demo, bench): the debug kernel (tierd + DEBUG_VM,
# lockdep, KASAN) is a from-scratch build of its own, which `make test` adds.
DEFAULT_KERNELS = ("stock", "tierd")
# PID 1 after the initramfs: guest-init.sh itself, or the host's systemd
# (guest-init.sh sets up and execs it; the command runs as a unit).
INITS = ("shell", "systemd")
# Modules a stock Debian kernel needs before it can mount the lab's root.
STOCK_BOOT_MODULES = ("9pnet_virtio", "9p", "overlay")
# guest-init.sh creates this file in /lab-out right before it runs the command:
# written through 9p to the host at once, it survives a panic that the console
# (buffered, interleaved with kernel messages) might garble.
STARTED_MARKER = "started"
# Under multi-threaded TCG about 1 boot in 14 panics before userspace (an int3
# trap in sched_clock_tick, most likely the kernel's int3-based text patching
# racing with the other vCPU); such a boot is tried again, at most this often.
BOOT_ATTEMPTS = 3
PANIC_MARK = "Kernel panic - not syncing"


class LabError(RuntimeError):
    """The lab could not be built or booted."""


@dataclass(frozen=True)
class LabKernel:
    name: str
    image: Path
    release: str
    modules: Path | None  # lib/modules of a modular kernel, None when built in


@dataclass(frozen=True)
class GuestResult:
    rc: int | None  # None when the guest never reported one (crash, timeout)
    console: str
    dmesg: str
    outdir: Path
    started: bool = False  # the guest reached its command (STARTED_MARKER)
    # Panic lines of earlier boots of this run that died before the command.
    early_panics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plugin:
    """A TCG plugin for QEMU's -plugin option; "{outdir}" in a value is the results share."""

    path: Path
    args: tuple[tuple[str, str], ...] = ()

    def option(self, outdir: Path) -> str:
        return ",".join([str(self.path), *(f"{k}={v.format(outdir=outdir)}" for k, v in self.args)])


def panic_line(console: str) -> str | None:
    """The kernel's "Kernel panic - not syncing: ..." line, without its timestamp."""
    for line in console.splitlines():
        at = line.find(PANIC_MARK)
        if at >= 0:
            return line[at:].strip()
    return None


def early_panic(result: GuestResult) -> str | None:
    """The panic line if the guest panicked before its command started, else None.

    Only such a boot may be retried: once the command has started, a panic or
    a failure is the command's own result and must be reported, not hidden.
    """
    if result.started or result.rc is not None:
        return None
    return panic_line(result.console)


def lab_kernel(name: str) -> LabKernel:
    """Build or fetch a lab kernel (cached; a no-op when nothing changed)."""
    script = "fetch-stock-kernel.sh" if name == "stock" else "build-kernel.sh"
    args = [] if name == "stock" else [name]  # build-kernel.sh's flavour
    done = subprocess.run(
        [str(LAB_DIR / script), *args], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise LabError(f"{script} failed with exit code {done.returncode}")
    out = Path(done.stdout.strip().splitlines()[-1])
    release = (out / "kernelrelease").read_text().strip()
    if name != "stock":
        return LabKernel(name, out / "bzImage", release, None)
    return LabKernel(name, out / "vmlinuz", release, out / "lib" / "modules")


def _stock_module_files(kernel: LabKernel) -> list[Path]:
    assert kernel.modules is not None
    files: list[Path] = []
    for module in STOCK_BOOT_MODULES:
        deps = subprocess.run(
            ["modprobe", "-d", str(kernel.modules.parent.parent), "-S", kernel.release,
             "--show-depends", module],
            stdout=subprocess.PIPE, text=True, check=True,
        ).stdout.split("\n")
        for line in deps:
            if line.startswith("insmod "):
                path = Path(line.split()[1])
                if path not in files:
                    files.append(path)
    return files


def initramfs(kernel: LabKernel) -> Path:
    """A busybox initramfs that mounts the host root; cached per kernel."""
    busybox = Path("/bin/busybox")
    init = LAB_DIR / "initramfs-init.sh"
    modules = _stock_module_files(kernel) if kernel.modules else []
    key = hashlib.sha256(
        b"".join([init.read_bytes(), busybox.read_bytes()] + [bytes(m) for m in modules])
    ).hexdigest()[:16]
    image = CACHE / "initramfs" / f"{kernel.name}-{kernel.release}-{key}.cpio"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "modules"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        shutil.copy(init, root / "init")
        (root / "init").chmod(0o755)
        order = []
        for module in modules:
            name = module.name.removesuffix(".xz")
            with open(root / "modules" / name, "wb") as out:
                subprocess.run(["xz", "-dc", str(module)], stdout=out, check=True)
            order.append(name)
        if order:
            (root / "modules" / "order").write_text("\n".join(order) + "\n")
        image.parent.mkdir(parents=True, exist_ok=True)
        listing = subprocess.run(
            ["find", "."], cwd=root, stdout=subprocess.PIPE, check=True
        ).stdout
        tmp_image = image.with_suffix(".tmp")
        with open(tmp_image, "wb") as out:
            subprocess.run(
                ["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=listing,
                stdout=out, check=True,
            )
        tmp_image.rename(image)
    return image


def topology_args(fast_mem: str, slow_mem: str) -> list[str]:
    """QEMU options for node 0 (CPUs + DRAM) and node 1 (CPU-less, slower per HMAT)."""
    args = [
        "-machine", "pc,hmat=on",
        "-smp", "2,sockets=2,maxcpus=2",
        "-m", sum_sizes(fast_mem, slow_mem),
        "-object", f"memory-backend-ram,id=m0,size={fast_mem}",
        "-object", f"memory-backend-ram,id=m1,size={slow_mem}",
        "-numa", "node,nodeid=0,memdev=m0",
        "-numa", "node,nodeid=1,memdev=m1,initiator=0",
        "-numa", "cpu,node-id=0,socket-id=0",
        "-numa", "cpu,node-id=0,socket-id=1",
    ]
    for target, latency, bandwidth in ((0, 100, "20G"), (1, 300, "5G")):
        base = f"hmat-lb,initiator=0,target={target},hierarchy=memory"
        args += ["-numa", f"{base},data-type=access-latency,latency={latency}"]
        args += ["-numa", f"{base},data-type=access-bandwidth,bandwidth={bandwidth}"]
    return args


def mib(size: str) -> int:
    return int(size[:-1]) * {"M": 1, "G": 1024}[size[-1].upper()]


def sum_sizes(*sizes: str) -> str:
    return f"{sum(map(mib, sizes))}M"


NodeRanges = dict[int, list[tuple[int, int]]]


def plugin_ram_ranges(fast_mem: str, slow_mem: str) -> NodeRanges:
    """Each node's range in the addresses QEMU 7.2's TCG plugins see for RAM.

    qemu_plugin_hwaddr_phys_addr() returns, for RAM, the access's ram_addr
    (its RAM block's offset among all blocks plus the offset inside) plus
    the block's offset in the machine's RAM container: not the guest-physical
    address. Node i's memory backend is both the i-th RAM block (created
    before the board's ROMs, back to back from 0, each start 256 KiB aligned,
    which sizes in MiB are) and the i-th piece of the container, so its
    accesses report 2 * start_i + offset, wherever the guest sees them (the
    PCI hole plays no part). tests/test_judge.py checks both nodes.
    """
    ranges: NodeRanges = {}
    start = 0
    for node, size in enumerate((fast_mem, slow_mem)):
        end = start + (mib(size) << 20)
        ranges[node] = [(2 * start, start + end)]
        start = end
    return ranges


def accelerator() -> str:
    """The QEMU accelerator: TIERD_LAB_ACCEL (kvm|tcg) if set, else KVM if it works.

    On our build hosts /dev/kvm opens but every guest dies at once with a KVM
    "emulation failure", so KVM is tried once per host boot with a tiny guest
    and the verdict cached; anything short of a clean power-off means TCG.
    """
    choice = os.environ.get("TIERD_LAB_ACCEL") or ("kvm" if _kvm_works() else "tcg")
    return {"tcg": "tcg,thread=multi", "kvm": "kvm"}[choice]


def _kvm_works() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    verdict = CACHE / f"kvm-works-{boot_id}"
    if not verdict.exists():
        kernel = lab_kernel("stock")
        # The initramfs finds no 9p share, says so and powers off: enough to
        # prove the CPU virtualization works.
        probe = [
            "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-kernel", str(kernel.image), "-initrd", str(initramfs(kernel)),
            "-append", "console=ttyS0 panic=-1 quiet", "-display", "none",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults",
        ]
        try:
            out = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=60, check=False).stdout
            works = b"reboot: Power down" in out
        except subprocess.TimeoutExpired:
            works = False
        verdict.parent.mkdir(parents=True, exist_ok=True)
        verdict.write_text("yes\n" if works else "no\n")
    return verdict.read_text().strip() == "yes"


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def boot(
    kernel: LabKernel,
    command: str,
    *,
    fast_mem: str = "2G",
    slow_mem: str = "2G",
    timeout: float = 3600,
    echo: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    init: str = "shell",
    attempts: int = BOOT_ATTEMPTS,
    log: Callable[[str], None] = _log_stderr,
    plugin: Plugin | None = None,
) -> GuestResult:
    """Boot the lab with `kernel`, run the shell `command` inside, power off.

    `init="systemd"` boots the host's systemd as PID 1 and runs `command` as
    a service once basic.target is reached. A boot whose kernel panicked
    before the command started is booted again, up to `attempts` boots in
    all, each retry announced through `log`; the command runs at most once.
    `plugin` is loaded into QEMU (TCG only).
    """
    if init not in INITS:
        raise LabError(f"unknown init {init!r} (one of {', '.join(INITS)})")
    panics: list[str] = []
    while True:
        result = _boot_once(kernel, command, fast_mem=fast_mem, slow_mem=slow_mem,
                            timeout=timeout, echo=echo, env=env, cwd=cwd, init=init,
                            plugin=plugin)
        panic = early_panic(result)
        if panic is None or len(panics) + 1 >= attempts:
            return replace(result, early_panics=tuple(panics))
        panics.append(panic)
        log(f"lab: guest panicked before its command started: {panic};"
            f" booting again ({len(panics) + 1} of {attempts})")


def _boot_once(
    kernel: LabKernel,
    command: str,
    *,
    fast_mem: str,
    slow_mem: str,
    timeout: float,
    echo: bool,
    env: dict[str, str] | None,
    cwd: Path,
    init: str,
    plugin: Plugin | None = None,
) -> GuestResult:
    """One boot, in a fresh results directory (no marker left from a previous one)."""
    outdir = Path(tempfile.mkdtemp(prefix=f"tierd-lab-{kernel.name}-"))
    guest_env = {"TIERD_LAB_KERNEL": kernel.name, "TIERD_LAB_CWD": str(cwd),
                 "TIERD_LAB_INIT": init,
                 # Where the kernel's build output is (its selftest sources among it).
                 "TIERD_LAB_KERNEL_DIR": str(kernel.image.parent)}
    if kernel.modules:
        guest_env["TIERD_LAB_MODULES"] = str(kernel.modules)
    guest_env.update(env or {})
    (outdir / "env").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in guest_env.items())
    )
    (outdir / "cmd").write_text(command + "\n")
    shutil.copy(LAB_DIR / "guest-init.sh", outdir / "guest-init.sh")
    cpu = "max" if accelerator().startswith("tcg") else "host"
    qemu = [
        "qemu-system-x86_64", "-accel", accelerator(), "-cpu", cpu,
        *topology_args(fast_mem, slow_mem),
        "-kernel", str(kernel.image), "-initrd", str(initramfs(kernel)),
        # NUMA balancing off: the kernel's own hinting-fault migration would
        # move the pages tierd is measured on (benchmarks enable it as a peer).
        "-append", "console=ttyS0 panic=-1 quiet loglevel=4 tsc=reliable numa_balancing=disable",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=labout,path={outdir},security_model=none",
        "-device", "virtio-9p-pci,fsdev=labout,mount_tag=labout",
        "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-nodefaults",
    ]
    if plugin is not None:
        if cpu != "max":
            raise LabError(f"TCG plugin {plugin.path} needs TCG, the lab runs {accelerator()}")
        qemu += ["-plugin", plugin.option(outdir)]
    console = _run_console(qemu, timeout, echo)
    rc_file, dmesg_file = outdir / "rc", outdir / "dmesg"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    dmesg = dmesg_file.read_text(errors="replace") if dmesg_file.exists() else ""
    return GuestResult(rc, console, dmesg, outdir, (outdir / STARTED_MARKER).exists())


def _run_console(qemu: list[str], timeout: float, echo: bool) -> str:
    """Run QEMU, streaming the serial console; kill it after `timeout` s."""
    proc = subprocess.Popen(
        qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed.is_set():
        lines.append(f"lab: QEMU killed after {timeout:.0f} s\n")
    return "".join(lines)


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="boot the lab and run a command inside")
    run.add_argument("--kernel", choices=KERNELS, default="tierd")
    run.add_argument("--fast-mem", default="2G", help="node 0 size (default 2G)")
    run.add_argument("--slow-mem", default="2G", help="node 1 size (default 2G)")
    run.add_argument("--timeout", type=float, default=3600)
    run.add_argument("--init", choices=INITS, default="shell",
                     help="PID 1: guest-init.sh (default) or systemd")
    run.add_argument("command", nargs=argparse.REMAINDER)
    kernels = sub.add_parser("kernels", help="build or fetch kernels, print where they are")
    kernels.add_argument("names", nargs="*", metavar="KERNEL",
                         help=f"any of {', '.join(KERNELS)} (default: {' '.join(DEFAULT_KERNELS)})")
    args = parser.parse_args()
    if args.cmd == "kernels":
        unknown = set(args.names) - set(KERNELS)
        if unknown:
            parser.error(f"unknown kernel(s) {', '.join(sorted(unknown))}: choose from {KERNELS}")
        for name in args.names or DEFAULT_KERNELS:
            k = lab_kernel(name)
            print(f"{name}: {k.release} {k.image}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.monotonic()
    result = boot(
        lab_kernel(args.kernel), shlex.join(command) or "true",
        fast_mem=args.fast_mem, slow_mem=args.slow_mem, timeout=args.timeout,
        init=args.init,
    )
    print(f"lab: guest exit code {result.rc} after {time.monotonic() - start:.0f} s",
          file=sys.stderr)
    return 1 if result.rc is None else result.rc


if __name__ == "__main__":
    sys.exit(_main())
