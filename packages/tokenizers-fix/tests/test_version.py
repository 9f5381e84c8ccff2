from importlib.metadata import version

import swiftune_tokenizers_fix


def test_version_comes_from_package_metadata():
    assert swiftune_tokenizers_fix.__version__ == version("swiftune-tokenizers-fix") != "0.0.0"
