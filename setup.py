"""Build script: kernels/ and scheduler/ live at the top level but install as lorafusion.kernels and
lorafusion.scheduler (the way DeepSpeed ships accelerator/), so that they stay free of the runtime."""

import os

from setuptools import find_packages, setup

TOP_LEVEL_SUBPACKAGES = {"kernels": "lorafusion.kernels", "scheduler": "lorafusion.scheduler"}


def _packages():
    packages = find_packages(include=["lorafusion", "lorafusion.*"])
    package_dir = {}
    for directory, name in TOP_LEVEL_SUBPACKAGES.items():
        package_dir[name] = directory
        packages.append(name)
        packages.extend(f"{name}.{sub}" for sub in find_packages(where=directory))
    return packages, package_dir


def _cuda_extension_args() -> dict:
    """The CUDA extension backend built ahead of time, only when LORAFUSION_BUILD_CUDA=1: the normal
    install needs no compiler and no CUDA torch (without it, backend="cuda" builds it just in time)."""
    if os.environ.get("LORAFUSION_BUILD_CUDA") != "1":
        return {}
    import torch  # the installed one: build with pip's --no-build-isolation

    if torch.version.cuda is None:
        raise RuntimeError(
            f"LORAFUSION_BUILD_CUDA=1 needs a CUDA build of torch and nvcc; this torch is {torch.__version__}"
        )
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = ["csrc/bindings.cpp"] + sorted(f"csrc/{name}" for name in os.listdir("csrc") if name.endswith(".cu"))
    extension = CUDAExtension(
        "lorafusion_cuda",
        sources,
        # No --use_fast_math: the NF4 kernel is bit-exact and the dropout threshold compares floats.
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, include_package_data=True, **_cuda_extension_args())
