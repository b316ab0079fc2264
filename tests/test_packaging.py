"""Packaging: the .deb (dpkg-buildpackage), the RPM (rpmbuild), the Kubernetes DaemonSet.

The .deb is built for real here and installed and started as a service in the
lab guest by tests/test_systemd.py (which uses build_deb from this module).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import pytest
import yaml

import tierd

REPO = Path(__file__).resolve().parent.parent
# What a source package needs: the Python package, its metadata, the unit,
# the shipped config, the docs and examples the packages install, and the
# tests the .deb's build runs.
SOURCE_PATHS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "tierd", "config",
                "tierd.service", "docs", "packaging", "tests")
# Debian's tools and Python only: a pyenv or virtualenv python3 first on PATH
# would build with the wrong interpreter.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The packages carry the C extensions (tierd/*/_*.c), built for this machine.
EXTENSIONS = ("tierd/movers/_native.cpython-*.so", "tierd/kernel/_gather.cpython-*.so")
DEB_DEPENDS = {"python3-yaml", "python3-prometheus-client", "python3-numpy",
               "python3-jsonschema", "python3-systemd"}

needs_dpkg_buildpackage = pytest.mark.skipif(
    shutil.which("dpkg-buildpackage") is None or shutil.which("dh_python3") is None,
    reason="needs dpkg-dev, debhelper, dh-python (tests/lab/debian-packages.txt)")


def copy_source(dest: Path) -> Path:
    """The checkout's package sources (working tree, without caches) under dest."""
    dest.mkdir(parents=True)
    # Packages build their own extensions; fixture trees hold symlink cycles.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".pytest_cache")
    for name in SOURCE_PATHS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, dest / name)
    return dest


def build_deb(workdir: Path, check: bool = False) -> Path:
    """dpkg-buildpackage -us -uc -b on a copy of the sources; the .deb's path.

    check: run the host tests during the build, as a real build does (the lab
    guests skip them: they pass on the host, and take long under TCG)."""
    source = copy_source(workdir / "tierd")
    shutil.copytree(REPO / "packaging" / "debian", source / "debian")
    options = {} if check else {"DEB_BUILD_OPTIONS": "nocheck"}
    done = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source,
        env={**os.environ, "PATH": SYSTEM_PATH, **options}, capture_output=True, text=True,
        check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (workdir / "build.log").write_text(done.stdout + done.stderr)
    (deb,) = workdir.glob(f"tierd_{tierd.__version__}_*.deb")
    return deb


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True,
                          text=True, check=True).stdout.strip()


def relation_names(value: str) -> set[str]:
    return {part.split()[0] for part in value.replace("|", ",").split(",") if part.strip()}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-buildpackage") is None or shutil.which("dh_python3") is None:
        pytest.skip("needs dpkg-dev, debhelper, dh-python (tests/lab/debian-packages.txt)")
    return build_deb(tmp_path_factory.mktemp("deb"), check=True)


_lab_debs: list[Path] = []


def lab_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb built once per lab guest, for every systemd-guest test that installs it."""
    if not _lab_debs:
        _lab_debs.append(build_deb(tmp_path_factory.mktemp("deb")))
    return _lab_debs[0]


def test_changelog_version_is_the_package_version() -> None:
    first = (REPO / "packaging/debian/changelog").read_text().splitlines()[0]
    assert first.startswith(f"tierd ({tierd.__version__}) ")
    spec = (REPO / "packaging/rpm/tierd.spec").read_text()
    assert f"\nVersion:        {tierd.__version__}\n" in spec


@needs_dpkg_buildpackage
def test_deb_holds_the_program_the_unit_and_the_config_as_conffile(deb: Path,
                                                                   tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN")], check=True)
    assert (tmp_path / "usr/bin/tierd").stat().st_mode & 0o111
    assert (tmp_path / "usr/bin/tierd").read_text().startswith("#!/usr/bin/python3")
    assert (tmp_path / "usr/lib/python3/dist-packages/tierd/service/systemd.py").is_file()
    site = tmp_path / "usr/lib/python3/dist-packages"
    assert all(list(site.glob(extension)) for extension in EXTENSIONS)
    assert (tmp_path / "lib/systemd/system/tierd.service").read_bytes() == \
        (REPO / "tierd.service").read_bytes()
    assert (tmp_path / "etc/tierd/tierd.yaml").read_bytes() == \
        (REPO / "config/tierd.yaml").read_bytes()
    assert (tmp_path / "DEBIAN/conffiles").read_text().split() == ["/etc/tierd/tierd.yaml"]
    assert "\ndry_run: true\n" in (tmp_path / "etc/tierd/tierd.yaml").read_text()
    # The unit's Documentation= points here, so it must not be compressed.
    assert (tmp_path / "usr/share/doc/tierd/install.md").is_file()


@needs_dpkg_buildpackage
def test_deb_ships_examples_man_pages_and_completion(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    examples = tmp_path / "usr/share/doc/tierd/examples"
    for name in ("alerts.yml", "alerts_test.yml", "tierd-dashboard.json", "daemonset.yaml",
                 *(p.name for p in (REPO / "config/examples").glob("*.yaml"))):
        assert (examples / name).is_file(), name  # uncompressed: usable as they are
    assert (tmp_path / "usr/share/man/man8/tierd.8.gz").is_file()
    assert (tmp_path / "usr/share/man/man5/tierd.yaml.5.gz").is_file()
    assert (tmp_path / "usr/share/bash-completion/completions/tierd").read_bytes() == \
        (REPO / "packaging/cli/completions/tierd").read_bytes()
    assert (tmp_path / "usr/share/zsh/vendor-completions/_tierd").is_file()


@needs_dpkg_buildpackage
def test_deb_build_ran_the_host_tests(deb: Path) -> None:
    log = (deb.parent / "build.log").read_text()
    assert re.search(r"^\d+ passed", log, re.MULTILINE), log[-2000:]
    assert "test_policy.py" not in log or " failed" not in log


@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian")
@needs_dpkg_buildpackage
def test_deb_is_lintian_clean(deb: Path) -> None:
    done = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)],
                          capture_output=True, text=True, check=False)
    findings = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert findings == [], done.stdout


# Stand-ins for the commands the maintainer scripts call: each logs its argv.
STUBS = ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "py3compile", "py3clean",
         "pypy3compile", "dpkg")


def run_script(script: Path, args: list[str], tmp_path: Path) -> list[str]:
    """Run a maintainer script as on a systemd host; the systemd calls it made."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    log.write_text("")
    for name in STUBS:
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (stubs / name).chmod(0o755)
    booted = tmp_path / "run-systemd-system"
    booted.mkdir(exist_ok=True)
    text = script.read_text().replace("/run/systemd/system", str(booted))
    subprocess.run(["sh", "-c", text, script.name, *args], check=True,
                   env={"PATH": f"{stubs}:{SYSTEM_PATH}"})
    return [line for line in log.read_text().splitlines()
            if line.split()[0] in ("deb-systemd-invoke", "systemctl")
            and "daemon-reload" not in line]


@needs_dpkg_buildpackage
def test_deb_restarts_after_upgrade_and_stops_on_remove(deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    postinst, prerm = control / "postinst", control / "prerm"
    # A fresh install enables tierd but does not start it (docs/install.md says why).
    assert run_script(postinst, ["configure", ""], tmp_path) == []
    # An upgrade restarts a running tierd with the new code (and leaves a stopped one).
    assert run_script(postinst, ["configure", "0.0.9"], tmp_path) == [
        "deb-systemd-invoke try-restart tierd.service"]
    # The old prerm keeps tierd running through an upgrade, and stops it on remove.
    assert run_script(prerm, ["upgrade", "0.1.1"], tmp_path) == []
    assert run_script(prerm, ["remove"], tmp_path) == ["deb-systemd-invoke stop tierd.service"]


@needs_dpkg_buildpackage
def test_deb_depends_and_recommends(deb: Path) -> None:
    assert relation_names(deb_field(deb, "Depends")) >= DEB_DEPENDS
    assert "bcc" not in relation_names(deb_field(deb, "Depends"))
    assert relation_names(deb_field(deb, "Recommends")) == {"python3-bpfcc"}
    host_arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                               text=True, check=True).stdout.strip()
    assert deb_field(deb, "Architecture") == host_arch
    assert "libc6" in relation_names(deb_field(deb, "Depends"))  # the extension's, by shlibs


def test_deb_depends_name_only_installable_debian_packages() -> None:
    """Every dependency the .deb names is a package this host's apt knows."""
    control = (REPO / "packaging/debian/control").read_text()
    wanted = DEB_DEPENDS | {"python3-bpfcc"}
    for name in sorted(wanted):
        assert name in control
        shown = subprocess.run(["apt-cache", "show", "--no-all-versions", name],
                               capture_output=True, text=True, check=False)
        assert shown.returncode == 0 and f"Package: {name}" in shown.stdout, name


# --- RPM ----------------------------------------------------------------------------

# Fedora's python3-rpm-macros and systemd-rpm-macros are not in Debian; stand
# in for the few the spec uses, only where this rpmbuild lacks them. The
# systemd scriptlets do what Fedora's do: preset on install, disable --now on
# erase ($1 = 0), try-restart after an upgrade ($1 >= 1).
DEBIAN_RPM_MACROS = {
    "__python3": "/usr/bin/python3",
    "python3_sitearch": "/usr/lib/python3/dist-packages",
    "_unitdir": "/lib/systemd/system",
    "systemd_post()": "if [ $1 -eq 1 ]; then systemctl --no-reload preset %{?*} || :; fi",
    "systemd_preun()":
        "if [ $1 -eq 0 ]; then systemctl --no-reload disable --now %{?*} || :; fi",
    "systemd_postun_with_restart()":
        "if [ $1 -ge 1 ]; then systemctl try-restart %{?*} || :; fi",
}


def rpm_defines() -> list[str]:
    args = []
    for macro, value in DEBIAN_RPM_MACROS.items():
        name = macro.removesuffix("()")
        known = subprocess.run(["rpm", "--eval", f"%{{?{name}:yes}}"], capture_output=True,
                               text=True, check=True).stdout.strip()
        if known != "yes":
            args += ["--define", f"{macro} {value}"]
    return args


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("rpmbuild") is None:
        pytest.skip("needs rpmbuild (Debian's rpm)")
    tmp_path = tmp_path_factory.mktemp("rpm")
    version = tierd.__version__
    top = tmp_path / "rpmbuild"
    sources = top / "SOURCES"
    sources.mkdir(parents=True)
    tree = copy_source(tmp_path / f"tierd-{version}")
    with tarfile.open(sources / f"tierd-{version}.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=f"tierd-{version}")
    done = subprocess.run(
        ["rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}", *rpm_defines(),
         str(REPO / "packaging/rpm/tierd.spec")],
        env={**os.environ, "PATH": SYSTEM_PATH, "DEB_PYTHON_INSTALL_LAYOUT": "deb_system"},
        capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    arch = os.uname().machine
    (built,) = (top / "RPMS" / arch).glob(f"tierd-{version}-1*.{arch}.rpm")
    return built


def test_rpm_builds_with_rpmbuild(rpm: Path) -> None:
    listing = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "/usr/bin/tierd" in listing
    assert "/lib/systemd/system/tierd.service" in listing
    assert "/etc/tierd/tierd.yaml" in listing
    for wanted in ("/usr/share/man/man8/tierd.8*", "/usr/share/man/man5/tierd.yaml.5*",
                   "/usr/share/bash-completion/completions/tierd",
                   "/usr/share/doc/tierd*/examples/alerts.yml",
                   "/usr/share/doc/tierd*/examples/tierd-dashboard.json"):
        assert fnmatch.filter(listing, wanted), wanted
    assert all(any(fnmatch.fnmatch(path, f"*/{extension}") for path in listing)
               for extension in EXTENSIONS)
    config = subprocess.run(["rpm", "-qcp", str(rpm)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert config == ["/etc/tierd/tierd.yaml"]
    requires = subprocess.run(["rpm", "-qRp", str(rpm)], capture_output=True, text=True,
                              check=True).stdout
    for name in ("python3-pyyaml", "python3-prometheus_client", "python3-numpy",
                 "python3-jsonschema", "python3-systemd"):
        assert name in requires


# --- Kubernetes ----------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((REPO / "packaging/k8s/daemonset.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def test_daemonset_is_privileged_in_the_host_pid_namespace() -> None:
    ds = manifests()["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["hostPID"] is True
    (container,) = pod["containers"]
    assert container["securityContext"]["privileged"] is True
    assert container["command"][0] == "/usr/bin/tierd"
    from tierd import cli
    args = cli.build_parser().parse_args(container["command"][1:])
    assert (args.command, args.log_format) == ("run", "json")  # no journald in a pod
    assert container["image"]


def test_daemonset_mounts_sys_proc_and_the_config() -> None:
    everything = manifests()
    pod = everything["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m["name"] in volumes for m in mounts.values())
    assert volumes[mounts["/sys"]["name"]]["hostPath"]["path"] == "/sys"
    assert not mounts["/sys"].get("readOnly"), "the idle bitmap is written"
    # The host's lock directory: one tierd per host, pod or service.
    assert volumes[mounts["/run/tierd"]["name"]]["hostPath"]["path"] == "/run/tierd"
    assert all(v.get("hostPath", {}).get("path") != "/proc" for v in volumes.values()), \
        "tierd reads the pod's /proc (hostPID); a host /proc mount is unused"
    assert set(volumes) == {m["name"] for m in mounts.values()}, "a volume nothing mounts"
    config_volume = volumes[mounts["/etc/tierd"]["name"]]
    config_map = everything["ConfigMap"]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["namespace"] == everything["DaemonSet"]["metadata"]["namespace"]
    port = container["ports"][0]
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]
    # /metrics is served from another thread: only /healthz sees a hung main loop.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_daemonset_runs_on_tiered_nodes_as_a_critical_node_agent() -> None:
    pod = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["tierd/tiered-memory"] == "true"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["automountServiceAccountToken"] is False


def test_pod_monitor_scrapes_the_daemonset_metrics_port_as_job_tierd() -> None:
    monitor = yaml.safe_load((REPO / "packaging/k8s/podmonitor.yaml").read_text())
    ds = manifests()["DaemonSet"]
    assert monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        ds["spec"]["template"]["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert endpoint["port"] == container["ports"][0]["name"]
    assert {"targetLabel": "job", "replacement": "tierd"} in endpoint["relabelings"]


def test_containerfile_installs_the_deb_on_its_debian_and_runs_the_daemonset_command() -> None:
    text = (REPO / "packaging/k8s/Containerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM debian:bookworm-slim"
    assert Path("/etc/debian_version").read_text().startswith("12"), "the .deb's Debian"
    assert "COPY tierd_*.deb /tmp/" in instructions
    assert "apt-get install -y --no-install-recommends /tmp/tierd_*.deb" in text
    entrypoint = json.loads(text.split("ENTRYPOINT ", 1)[1].splitlines()[0])
    cmd = json.loads(text.split("CMD ", 1)[1].splitlines()[0])
    (container,) = manifests()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert entrypoint + cmd == container["command"]
    assert container["image"] == f"tierd:{tierd.__version__}"


def test_daemonset_config_is_a_valid_tierd_config(tmp_path: Path) -> None:
    """The ConfigMap's tierd.yaml passes `tierd check-config`, and its metrics port is
    the container port the probes use."""
    from tierd import config

    text = manifests()["ConfigMap"]["data"]["tierd.yaml"]
    path = tmp_path / "tierd.yaml"
    path.write_text(text)
    loaded = config.load(path)
    container = manifests()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert loaded.metrics.port == container["ports"][0]["containerPort"]
    assert loaded.metrics.enabled


def rpm_scriptlet(rpm: Path, tag: str) -> str:
    return subprocess.run(["rpm", "-qp", "--qf", f"%{{{tag}}}", str(rpm)], capture_output=True,
                          text=True, check=True).stdout


def run_scriptlet(body: str, arg: int, tmp_path: Path) -> list[str]:
    """Run an RPM scriptlet with $1 = arg; the systemctl calls it made."""
    stub = tmp_path / "bin" / "systemctl"
    stub.parent.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    log.write_text("")
    stub.write_text(f'#!/bin/sh\necho "systemctl $*" >> {log}\n')
    stub.chmod(0o755)
    subprocess.run(["sh", "-c", body, "scriptlet", str(arg)], check=True,
                   env={"PATH": f"{stub.parent}:{SYSTEM_PATH}"})
    return log.read_text().splitlines()


def test_rpm_restarts_after_upgrade_and_stops_on_erase(rpm: Path, tmp_path: Path) -> None:
    post, preun, postun = (rpm_scriptlet(rpm, tag) for tag in ("POSTIN", "PREUN", "POSTUN"))
    # rpm's $1: packages of this name left after the step (1 install, 2 upgrade, 0 erase).
    assert run_scriptlet(post, 1, tmp_path) == ["systemctl --no-reload preset tierd.service"]
    assert run_scriptlet(preun, 1, tmp_path) == []  # the old one, during an upgrade
    assert run_scriptlet(postun, 1, tmp_path) == ["systemctl try-restart tierd.service"]
    assert run_scriptlet(preun, 0, tmp_path) == [
        "systemctl --no-reload disable --now tierd.service"]
    assert run_scriptlet(postun, 0, tmp_path) == []


# --- the package's lifecycle on a systemd host (the lab guest) ------------------------


def repack(deb: Path, version: str, out: Path) -> Path:
    """The same package as `version`, whose tierd reports that version: a dpkg upgrade
    from deb to it runs both packages' maintainer scripts, and the metrics say which
    code is running."""
    tree = out / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(),
                              flags=re.MULTILINE))
    init = tree / "usr/lib/python3/dist-packages/tierd/__init__.py"
    init.write_text(init.read_text().replace(f'"{tierd.__version__}"', f'"{version}"'))
    sums = tree / "DEBIAN" / "md5sums"
    digest = hashlib.md5(init.read_bytes()).hexdigest()
    sums.write_text(re.sub(r"^\w+(  usr/lib/python3/dist-packages/tierd/__init__\.py)$",
                           rf"{digest}\1", sums.read_text(), flags=re.MULTILINE))
    built = out / f"tierd_{version}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(built)], check=True,
                   capture_output=True)
    return built


def running_version() -> str:
    """tierd_build_info's version label, from the running daemon's metrics."""
    with urllib.request.urlopen("http://127.0.0.1:9748/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(r'^tierd_build_info\{[^}]*version="([^"]+)"', text, re.MULTILINE)
    assert found, text[:2000]
    return found.group(1)


@pytest.mark.vm(kernels=["tierd"], init="systemd")
def test_deb_upgrade_restarts_tierd_and_remove_stops_it(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    deb = lab_deb(tmp_path_factory)
    newer = repack(deb, f"{tierd.__version__}+lab1", tmp_path_factory.mktemp("newer"))
    # The guest's root is the build host's, a container whose policy-rc.d (exit 101)
    # forbids maintainer scripts to start, restart or stop services; a real host
    # has none. The guest's writable overlay lets it go for this test.
    policy = Path("/usr/sbin/policy-rc.d")
    saved = policy.read_bytes() if policy.exists() else None
    policy.unlink(missing_ok=True)
    try:
        install_upgrade_remove(deb, newer)
    finally:
        if saved is not None:
            policy.write_bytes(saved)
            policy.chmod(0o755)


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, given the time a restart inside it takes in a TCG guest on a busy host."""
    return subprocess.run(["dpkg", *args], capture_output=True, text=True, check=False,
                          timeout=1800)


def install_upgrade_remove(deb: Path, newer: Path) -> None:
    from test_systemd import sh, unit, wait_for

    def journal() -> str:
        return sh("journalctl", "-u", "tierd", "--no-pager", "-n", "40").stdout

    installed = dpkg("-i", str(deb))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert unit("ActiveState") == "inactive", "a fresh install must not start tierd"
    started = sh("systemctl", "start", "tierd", check=False)
    assert started.returncode == 0, journal()
    first_pid = unit("MainPID")
    assert running_version() == tierd.__version__

    upgraded = dpkg("-i", str(newer))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    wait_for("tierd active again", lambda: unit("ActiveState") == "active", 600)
    assert unit("MainPID") not in (first_pid, "0"), "the upgrade did not restart tierd"
    assert running_version() == f"{tierd.__version__}+lab1", "the old code is still running"

    removed = dpkg("-r", "tierd")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert unit("ActiveState") in ("inactive", ""), journal()
    assert sh("pgrep", "-f", "/usr/bin/tierd run", check=False).returncode == 1, \
        "tierd still runs after its package was removed"
