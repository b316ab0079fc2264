"""Packaging: the .deb (dpkg-buildpackage), the RPM (rpmbuild), the Kubernetes DaemonSet.

The .deb is built for real here and installed and started as a service in the
lab guest by tests/test_systemd.py (which uses build_deb from this module).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

import tierd

REPO = Path(__file__).resolve().parent.parent
# What a source package needs: the Python package, its metadata, the unit,
# the shipped config and the docs the packages install.
SOURCE_PATHS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "tierd", "config",
                "tierd.service", "docs")
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
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")  # packages build their own
    for name in SOURCE_PATHS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def build_deb(workdir: Path) -> Path:
    """dpkg-buildpackage -us -uc -b on a copy of the sources; the .deb's path."""
    source = copy_source(workdir / "tierd")
    shutil.copytree(REPO / "packaging" / "debian", source / "debian")
    done = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source,
        env={**os.environ, "PATH": SYSTEM_PATH}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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
    return build_deb(tmp_path_factory.mktemp("deb"))


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
    # The unit's Documentation= points here, so it must not be compressed.
    assert (tmp_path / "usr/share/doc/tierd/install.md").is_file()
    # Enabled on install, not started (docs/install.md says why).
    postinst = (tmp_path / "DEBIAN/postinst").read_text()
    assert "deb-systemd-helper" in postinst and "deb-systemd-invoke" not in postinst


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
# in for the few the spec uses, only where this rpmbuild lacks them.
DEBIAN_RPM_MACROS = {
    "__python3": "/usr/bin/python3",
    "python3_sitearch": "/usr/lib/python3/dist-packages",
    "_unitdir": "/lib/systemd/system",
    "systemd_post()": "true",
    "systemd_preun()": "true",
    "systemd_postun_with_restart()": "true",
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


@pytest.mark.skipif(shutil.which("rpmbuild") is None, reason="needs rpmbuild (Debian's rpm)")
def test_rpm_builds_with_rpmbuild(tmp_path: Path) -> None:
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
    (rpm,) = (top / "RPMS" / arch).glob(f"tierd-{version}-1*.{arch}.rpm")
    listing = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "/usr/bin/tierd" in listing
    assert "/lib/systemd/system/tierd.service" in listing
    assert "/etc/tierd/tierd.yaml" in listing
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
    assert container["command"][:2] == ["/usr/bin/tierd", "run"]
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
    assert volumes[mounts["/host/proc"]["name"]]["hostPath"]["path"] == "/proc"
    config_volume = volumes[mounts["/etc/tierd"]["name"]]
    config_map = everything["ConfigMap"]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["namespace"] == everything["DaemonSet"]["metadata"]["namespace"]
    port = container["ports"][0]
    assert container["livenessProbe"]["httpGet"]["port"] == port["name"]


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
