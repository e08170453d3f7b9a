"""dpunet: self-configuring U-Net segmentation trained with patient-level differential privacy."""

__version__ = "0.1.0"
