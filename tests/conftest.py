import os

import pytest

pytest_plugins = ("lab.plugin",)


@pytest.fixture(autouse=True, scope="session")
def _instance_lock_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A `tierd run` started by a test takes its one-per-host lock here, not in the
    host's /run/tierd (where a real tierd, or another checkout's tests, may hold it)."""
    os.environ.setdefault("RUNTIME_DIRECTORY", str(tmp_path_factory.mktemp("run")))
