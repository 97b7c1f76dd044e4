"""Build slmkern._C (torch-free C++ kernels) with CMake; install kernels/ as slmkern.kernels."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("SLMKERN_BUILD_TYPE", "Release")
        cfg = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSLMKERN_OUTPUT_DIR={out_dir}",
        ]
        if os.environ.get("SLMKERN_SANITIZE"):
            cfg.append(f"-DSLMKERN_SANITIZE={os.environ['SLMKERN_SANITIZE']}")
        subprocess.run(cfg, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)],
                       cwd=build_dir, check=True)


setup(
    packages=[
        "slmkern", "slmkern.ops", "slmkern.formats", "slmkern.interop", "slmkern._backends", "slmkern.nn",
        "slmkern.algorithms", "slmkern.kernels", "slmkern.benchmarks",
    ],
    package_dir={"slmkern": "slmkern", "slmkern.kernels": "kernels",
                 "slmkern.benchmarks": "benchmarks"},
    ext_modules=[CMakeExtension("slmkern._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
