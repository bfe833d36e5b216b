"""mlsys: robust U-Net segmentation of histology (Avramidis et al.), tracked with DVC and MLflow."""

__version__ = "0.1.0"
