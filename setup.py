"""The C extensions and the build's revision; everything else is in pyproject.toml."""

import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


def extension(module: str) -> Extension:
    return Extension(module, [module.replace(".", "/") + ".c"], depends=["tierd/_buffers.h"],
                     extra_compile_args=["-O2", "-Wall", "-Wextra"])


class BuildWithRevision(build_py):
    """Writes tierd/_revision.py (tierd_build_info's revision) when built from a checkout."""

    def run(self) -> None:
        super().run()
        if not Path(".git").exists():
            return
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            target = Path(self.build_lib) / "tierd" / "_revision.py"
            target.write_text(f'REVISION = "{done.stdout.strip()}"\n')


setup(ext_modules=[extension("tierd.movers._native"), extension("tierd.kernel._gather")],
      cmdclass={"build_py": BuildWithRevision})
