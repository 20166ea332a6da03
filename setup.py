"""Build the optional Cython extensions; fall back to the pure-Python twins when they cannot be
built.

Metadata lives in pyproject.toml; this file only declares ext_modules.
"""

import multiprocessing
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

EXTENSIONS = ["raftfast._log", "raftfast._batch", "raftfast._store", "raftfast._sync"]


class OptionalBuildExt(build_ext):
    """Compile the extensions, but let the install succeed (pure Python) without a C compiler."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:  # (one module per core: 29 s -> 20 s here, with 2)
            self.parallel = _workers()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "install pure"
            self._warn(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if os.environ.get("RAFTFAST_REQUIRE_COMPILED"):
            raise exc
        print(
            f"WARNING: raftfast extensions not built ({exc}); installing pure Python",
            file=sys.stderr,
        )


def _workers() -> int:
    """Modules built at once: one per core, no more than there are modules."""
    return min(len(EXTENSIONS), os.cpu_count() or 1)


def extensions() -> list:
    if os.environ.get("RAFTFAST_PUREPYTHON"):
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        return []
    # Stripped on Linux (no symbol table or debug info in the wheel's .so); -O3 everywhere.
    link_args = ["-s"] if sys.platform.startswith("linux") else []
    exts = [
        Extension(
            name,
            [name.replace(".", "/") + ".pyx"],
            extra_compile_args=["-O3"],
            extra_link_args=link_args,
        )
        for name in EXTENSIONS
    ]
    return cythonize(
        exts,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
        quiet=True,
        # (processes: only where they fork; spawned ones would run this file again)
        nthreads=_workers() if multiprocessing.get_start_method() == "fork" else 0,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
