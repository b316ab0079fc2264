"""The one C extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tierd.movers._pagemap_index", ["tierd/movers/_pagemap_index.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
