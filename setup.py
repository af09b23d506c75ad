"""Build of l2l_fused. The native extension (csrc/) joins this file with the native-kernel issue; until
then the package is Python (plus Triton kernels, compiled at run time) and installs on any machine,
with or without CUDA."""

from setuptools import find_packages, setup

setup(
    name="l2l_fused",
    version="0.1.0",
    description="Fused kernels for the learned LSTM optimizer of Andrychowicz et al. (2016)",
    packages=find_packages(include=["l2l_fused", "l2l_fused.*"]),
    python_requires=">=3.10",
    # A range, never a bare name: an installed torch (2.13 here, 2.11 on the GPU machines) satisfies it.
    # triton: the fused kernels (on the CPU, its interpreter runs them for the tests); Linux wheels only.
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "triton; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["l2l-fused=l2l_fused.cli:main"]},
)
