"""pytest plugin: run `@pytest.mark.vm` tests inside the lab guest.

On the host, every vm test is parametrized by lab kernel (`lab_kernel`
fixture: "stock" or "tierd", or the subset named by
`@pytest.mark.vm(kernels=[...])`). The first vm test of a kernel boots one
guest for that kernel, which runs all of that kernel's selected vm tests with
this same plugin in guest mode; the guest's reports are serialized to the
results share and replayed into the host's pytest as if the tests had run
here. A test that failed in the guest carries the tail of the guest's dmesg.
Tests marked `@pytest.mark.vm(init="systemd")` get a guest of their own per
kernel, with systemd as PID 1; tests marked `@pytest.mark.vm(qemu_plugin=f)`
one whose QEMU loads the TCG plugin `f(lab_kernel)` returns (a vm.Plugin).

`pytest -m "not vm"` never starts QEMU. Only the kernels named in
TIERD_LAB_KERNELS (default "stock,tierd,debug") are booted; the debug kernel
runs only the tests that name it (move_phys_pages' selftest, integrity and
stress).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import pytest

GUEST_KERNEL = os.environ.get("TIERD_LAB_GUEST")  # set inside the guest only
GUEST_INIT = os.environ.get("TIERD_LAB_INIT", "shell")  # the guest's PID 1 (vm.INITS)
GUEST_PLUGIN = os.environ.get("TIERD_LAB_QEMU_PLUGIN", "")  # the qemu_plugin's name
RESULTS_ENV = "TIERD_LAB_RESULTS"
# The kernels the host boots for the vm tests that name them; the others are deselected.
LAB_KERNELS = tuple(os.environ.get("TIERD_LAB_KERNELS", "stock,tierd,debug").split(","))
DMESG_TAIL = 80


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm(kernels=('stock', 'tierd'), init='shell', qemu_plugin=None): run inside the"
        " lab guest (init='systemd': with systemd as PID 1; qemu_plugin: a function of"
        " the kernel returning the vm.Plugin its QEMU loads)",
    )
    if GUEST_KERNEL is None:
        config.pluginmanager.register(HostLab(config), "tierd-lab-host")
    else:
        config.pluginmanager.register(GuestReporter(config), "tierd-lab-guest")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("vm")
    if marker is None:
        return
    kernels = marker.kwargs.get("kernels", ("stock", "tierd"))
    if "lab_kernel" not in metafunc.fixturenames:
        metafunc.fixturenames.append("lab_kernel")
    metafunc.parametrize("lab_kernel", kernels)


@pytest.fixture
def lab_kernel(request: pytest.FixtureRequest) -> str:
    """The lab kernel this vm test runs on: "stock", "tierd" or "debug"."""
    return request.param


def _kernel_of(item: pytest.Item) -> str | None:
    if item.get_closest_marker("vm") is None:
        return None
    return item.callspec.params["lab_kernel"]  # type: ignore[attr-defined]


Guest = tuple[str, str, str]  # (kernel, init, QEMU plugin's name or "")


def _plugin_name(plugin: object) -> str:
    return "" if plugin is None else f"{plugin.__module__}.{plugin.__qualname__}"  # type: ignore[attr-defined]


def _guest_of(item: pytest.Item) -> Guest | None:
    """(kernel, init, plugin) of the guest a vm test runs in; one boot per triple."""
    kernel = _kernel_of(item)
    marker = item.get_closest_marker("vm")
    if kernel is None or marker is None:
        return None
    return (kernel, marker.kwargs.get("init", "shell"),
            _plugin_name(marker.kwargs.get("qemu_plugin")))


def _label(guest: Guest) -> str:
    kernel, init, plugin = guest
    label = kernel if init == "shell" else f"{kernel}+{init}"
    return f"{label}+{plugin.rsplit('.', 1)[-1]}" if plugin else label


class GuestReporter:
    """Guest side: keep only this guest's vm tests, serialize every report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.out = open(os.environ[RESULTS_ENV], "a")  # noqa: SIM115 (closed at unconfigure)

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep = [i for i in items if _guest_of(i) == (GUEST_KERNEL, GUEST_INIT, GUEST_PLUGIN)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(
            config=self.config, report=report
        )
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    def pytest_unconfigure(self) -> None:
        self.out.close()


class HostLab:
    """Host side: boot each (kernel, init, plugin) once, replay the guest's reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[Guest, dict[str, list[pytest.TestReport]]] = {}
        self.dmesg: dict[Guest, str] = {}
        self.console: dict[Guest, str] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Drop vm tests of kernels not in LAB_KERNELS; run host tests first, then each
        guest's tests together.

        A replayed vm test skips pytest's setup and teardown, so a host test
        that came after one could find another module's fixtures still set up.
        """
        other = [i for i in items if _kernel_of(i) not in (None, *LAB_KERNELS)]
        if other:
            self.config.hook.pytest_deselected(items=other)
            items[:] = [i for i in items if i not in other]
        order = {None: 0}
        for item in items:
            order.setdefault(_guest_of(item), len(order))
        items.sort(key=lambda item: order[_guest_of(item)])

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        guest = _guest_of(item)
        if guest is None:
            return None
        if guest not in self.results:
            self._run_guest(guest, item.session)
        reports = self.results[guest].get(item.nodeid) or [self._missing(item, guest)]
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in reports:
            if report.failed:
                title = f"lab guest dmesg ({_label(guest)}, last {DMESG_TAIL} lines)"
                report.sections.append((title, self._dmesg_tail(guest)))
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_guest(self, guest: Guest, session: pytest.Session) -> None:
        from lab import vm  # imported late: "not vm" runs never need QEMU

        kernel, init, plugin_name = guest
        items = [i for i in session.items if _guest_of(i) == guest]
        nodeids = [i.nodeid for i in items]
        marker = items[0].get_closest_marker("vm")
        make_plugin = marker.kwargs.get("qemu_plugin") if marker else None
        lab_kernel = vm.lab_kernel(kernel)
        results = "/lab-out/results.jsonl"
        command = shlex.join(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
             "--rootdir", str(self.config.rootpath), *nodeids]
        )
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"lab: booting the {kernel} kernel (init: {init}) for {len(nodeids)} vm tests"
            )
        start = time.monotonic()
        # A retried early panic is said on the terminal (pytest captures stderr).
        log = {"log": reporter.write_line} if reporter is not None else {}
        result = vm.boot(
            lab_kernel, command, echo=False,
            env={"TIERD_LAB_GUEST": kernel, RESULTS_ENV: results,
                 "TIERD_LAB_QEMU_PLUGIN": plugin_name, "PYTHONDONTWRITEBYTECODE": "1"},
            cwd=self.config.rootpath, init=init,
            plugin=make_plugin(lab_kernel) if make_plugin else None, **log,
        )
        if reporter is not None:
            elapsed = time.monotonic() - start
            retried = len(result.early_panics)
            note = f", after {retried} boot(s) that panicked before the command" if retried else ""
            reporter.write_line(
                f"lab: {_label(guest)} guest done in {elapsed:.0f} s (exit {result.rc}{note})"
            )
        self.dmesg[guest] = result.dmesg or result.console
        self.console[guest] = result.console
        by_node: dict[str, list[pytest.TestReport]] = {}
        result_file = result.outdir / "results.jsonl"
        lines = result_file.read_text().splitlines() if result_file.exists() else []
        for line in lines:
            report = self.config.hook.pytest_report_from_serializable(
                config=self.config, data=json.loads(line)
            )
            if isinstance(report.longrepr, list):  # a skip's (path, line, reason) after JSON
                report.longrepr = tuple(report.longrepr)
            by_node.setdefault(report.nodeid, []).append(report)
        self.results[guest] = by_node

    def _dmesg_tail(self, guest: Guest) -> str:
        return "\n".join(self.dmesg.get(guest, "").splitlines()[-DMESG_TAIL:])

    def _missing(self, item: pytest.Item, guest: Guest) -> pytest.TestReport:
        console_tail = "\n".join(self.console.get(guest, "").splitlines()[-60:])
        return pytest.TestReport(
            nodeid=item.nodeid, location=item.location, keywords={}, outcome="failed",
            longrepr=f"no result from the {_label(guest)} lab guest;"
            f" its console ended:\n{console_tail}",
            when="call",
        )
