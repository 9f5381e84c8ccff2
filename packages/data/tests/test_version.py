from importlib.metadata import version

import swiftune_data


def test_version_comes_from_package_metadata():
    assert swiftune_data.__version__ == version("swiftune-data") != "0.0.0"
