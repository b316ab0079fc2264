"""pytest plugin: run `@pytest.mark.vm` tests inside the lab guest.

On the host, every vm test is parametrized by lab kernel (`lab_kernel`
fixture: "stock" or "tierd", or the subset named by
`@pytest.mark.vm(kernels=[...])`). The first vm test of a kernel boots one
guest for that kernel, which runs all of that kernel's selected vm tests with
this same plugin in guest mode; the guest's reports are serialized to the
results share and replayed into the host's pytest as if the tests had run
here. A test that failed in the guest carries the tail of the guest's dmesg.

`pytest -m "not vm"` never starts QEMU.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import pytest

GUEST_KERNEL = os.environ.get("TIERD_LAB_GUEST")  # set inside the guest only
RESULTS_ENV = "TIERD_LAB_RESULTS"
DMESG_TAIL = 80


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm(kernels=('stock', 'tierd')): run inside the lab guest"
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
    """The lab kernel this vm test runs on: "stock" or "tierd"."""
    return request.param


def _kernel_of(item: pytest.Item) -> str | None:
    if item.get_closest_marker("vm") is None:
        return None
    return item.callspec.params["lab_kernel"]  # type: ignore[attr-defined]


class GuestReporter:
    """Guest side: keep only this kernel's vm tests, serialize every report."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.out = open(os.environ[RESULTS_ENV], "a")  # noqa: SIM115 (closed at unconfigure)

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep = [i for i in items if _kernel_of(i) == GUEST_KERNEL]
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
    """Host side: boot each kernel once, replay the guest's reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, dict[str, list[pytest.TestReport]]] = {}
        self.dmesg: dict[str, str] = {}
        self.console: dict[str, str] = {}

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        kernel = _kernel_of(item)
        if kernel is None:
            return None
        if kernel not in self.results:
            self._run_guest(kernel, item.session)
        reports = self.results[kernel].get(item.nodeid) or [self._missing(item, kernel)]
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in reports:
            if report.failed:
                title = f"lab guest dmesg ({kernel}, last {DMESG_TAIL} lines)"
                report.sections.append((title, self._dmesg_tail(kernel)))
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _run_guest(self, kernel: str, session: pytest.Session) -> None:
        from lab import vm  # imported late: "not vm" runs never need QEMU

        nodeids = [i.nodeid for i in session.items if _kernel_of(i) == kernel]
        results = "/lab-out/results.jsonl"
        command = shlex.join(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
             "--rootdir", str(self.config.rootpath), *nodeids]
        )
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"lab: booting the {kernel} kernel for {len(nodeids)} vm tests")
        start = time.monotonic()
        guest = vm.boot(
            vm.lab_kernel(kernel), command, echo=False,
            env={"TIERD_LAB_GUEST": kernel, RESULTS_ENV: results,
                 "PYTHONDONTWRITEBYTECODE": "1"},
            cwd=self.config.rootpath,
        )
        if reporter is not None:
            reporter.write_line(
                f"lab: {kernel} guest done in {time.monotonic() - start:.0f} s (exit {guest.rc})"
            )
        self.dmesg[kernel] = guest.dmesg or guest.console
        self.console[kernel] = guest.console
        by_node: dict[str, list[pytest.TestReport]] = {}
        result_file = guest.outdir / "results.jsonl"
        lines = result_file.read_text().splitlines() if result_file.exists() else []
        for line in lines:
            report = self.config.hook.pytest_report_from_serializable(
                config=self.config, data=json.loads(line)
            )
            if isinstance(report.longrepr, list):  # a skip's (path, line, reason) after JSON
                report.longrepr = tuple(report.longrepr)
            by_node.setdefault(report.nodeid, []).append(report)
        self.results[kernel] = by_node

    def _dmesg_tail(self, kernel: str) -> str:
        return "\n".join(self.dmesg.get(kernel, "").splitlines()[-DMESG_TAIL:])

    def _missing(self, item: pytest.Item, kernel: str) -> pytest.TestReport:
        console_tail = "\n".join(self.console.get(kernel, "").splitlines()[-60:])
        return pytest.TestReport(
            nodeid=item.nodeid, location=item.location, keywords={}, outcome="failed",
            longrepr=f"no result from the {kernel} lab guest; its console ended:\n{console_tail}",
            when="call",
        )
