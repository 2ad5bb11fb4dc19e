"""refinery: an image data set through the whole life of a model, reproducibly."""

__version__ = "0.1.0"
