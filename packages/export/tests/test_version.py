from importlib.metadata import version

import swiftune_export


def test_version_comes_from_package_metadata():
    assert swiftune_export.__version__ == version("swiftune-export") != "0.0.0"
