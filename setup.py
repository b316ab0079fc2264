"""The C extensions; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup


def extension(module: str) -> Extension:
    return Extension(module, [module.replace(".", "/") + ".c"], depends=["tierd/_buffers.h"],
                     extra_compile_args=["-O2", "-Wall", "-Wextra"])


setup(ext_modules=[extension("tierd.movers._native"), extension("tierd.kernel._gather")])
