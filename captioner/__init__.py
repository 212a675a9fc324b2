"""Show, Attend and Tell image captioning with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
