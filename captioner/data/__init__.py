"""Data: Karpathy JSON reading, preprocessing to HDF5, the built-in shapes dataset, loaders."""
