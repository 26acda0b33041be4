"""Opt-in build of the native extension fastdiff._C; all package metadata lives in pyproject.toml.

    FASTDIFF_BUILD_EXT=1 pip install --no-build-isolation -e .

Without FASTDIFF_BUILD_EXT=1 the install is pure Python. With it, setuptools hands the build to CMakeLists.txt
(the same build `cmake -S . -B build` runs directly), so the two ways of building cannot drift apart, and
CMake decides alone whether the CUDA kernels are built. --no-build-isolation because the extension compiles
against the torch installed in the environment (an isolated build would not see it).
Environment: FASTDIFF_CMAKE_ARGS adds cmake options (e.g. "-DFASTDIFF_CUDA=OFF"); CMAKE_BUILD_PARALLEL_LEVEL
sets the number of compile jobs.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt, writing _C.abi3.so (and its build record _C.json) where setuptools
    expects the extension."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("FASTDIFF_BUILD_EXT=1 builds against the installed torch: install torch first and run pip with "
                     "--no-build-isolation")
        if shutil.which("cmake") is None:
            sys.exit("FASTDIFF_BUILD_EXT=1 needs cmake >= 3.25 on PATH (pip install cmake, or your package manager)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "pip"
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DFASTDIFF_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release"]
        configure += shlex.split(os.environ.get("FASTDIFF_CMAKE_ARGS", ""))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)
        if self.editable_mode:  # setuptools copies the library into the source tree; the record goes with it
            shutil.copy2(out_dir / "_C.json", ROOT / "fastdiff" / "_C.json")


def ext_modules() -> list[Extension]:
    if os.environ.get("FASTDIFF_BUILD_EXT", "0") != "1":
        return []
    return [Extension("fastdiff._C", sources=[], py_limited_api=True)]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": CMakeBuild})
