"""Build script: kernels/ and scheduler/ live at the top level but install as lorafusion.kernels and
lorafusion.scheduler (the way DeepSpeed ships accelerator/), so that they stay free of the runtime."""

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


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, include_package_data=True)
