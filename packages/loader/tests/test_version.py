from importlib.metadata import version

import swiftune_loader


def test_version_comes_from_package_metadata():
    assert swiftune_loader.__version__ == version("swiftune-loader") != "0.0.0"
