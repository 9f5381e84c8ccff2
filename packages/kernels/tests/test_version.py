from importlib.metadata import version

import swiftune_kernels


def test_version_comes_from_package_metadata():
    assert swiftune_kernels.__version__ == version("swiftune-kernels") != "0.0.0"
