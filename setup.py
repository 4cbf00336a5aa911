"""pip install also compiles kvloom's CPU kernels for this machine (kvloom/backends/cpu/build.py), so that no
start pays the ~5 s compile. A machine where they cannot be built still installs: kvloom then runs on
PyTorch ops, or builds them on a later start. Everything else is in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(HERE))  # kernel_build needs only the standard library
        from kvloom.backends.cpu.build import build_for_install

        # An editable install runs from the source tree: the .so goes beside the source there.
        dest = HERE if getattr(self, "editable_mode", False) else Path(self.build_lib)
        build_for_install(dest / "kvloom" / "backends" / "cpu")


setup(cmdclass={"build_py": BuildPyWithKernels})
