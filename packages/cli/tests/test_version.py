from importlib.metadata import version

import swiftune_cli


def test_version_comes_from_package_metadata():
    assert swiftune_cli.__version__ == version("swiftune-cli") != "0.0.0"
