import os

import pytest

pytest_plugins = ("lab.plugin",)


_OUTER_RUN_DIRECTORY = os.environ.get("RUNTIME_DIRECTORY")


@pytest.fixture(autouse=True, scope="session")
def _instance_lock_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A `tierd run` started by a test takes its one-per-host lock here, not in the
    host's /run/tierd (where a real tierd, or another checkout's tests, may hold it)."""
    os.environ.setdefault("RUNTIME_DIRECTORY", str(tmp_path_factory.mktemp("run")))


@pytest.fixture(autouse=True)
def _run_directory_per_test(tmp_path_factory: pytest.TempPathFactory,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """And one of its own for each test: a stopped tierd leaves its heat there for a
    start within minutes, which would carry one test's heat into the next."""
    if _OUTER_RUN_DIRECTORY is None:
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path_factory.mktemp("run")))
