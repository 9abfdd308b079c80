"""label-images: label image collections with a torchvision classifier, resumably."""

__version__ = "0.1.0"
