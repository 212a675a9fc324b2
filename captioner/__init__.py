"""Show, Attend and Tell image captioning with PyTorch Lightning and Hydra."""

from importlib.metadata import PackageNotFoundError, version

try:  # the version in pyproject.toml, as installed
    __version__ = version("captioner")
except PackageNotFoundError:  # a source tree that was never pip-installed
    __version__ = "0+unknown"
