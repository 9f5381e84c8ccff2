from importlib.metadata import version

import swiftune_train


def test_version_comes_from_package_metadata():
    assert swiftune_train.__version__ == version("swiftune-train") != "0.0.0"
