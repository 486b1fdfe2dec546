"""Data: a concrete data node → arrays, drawn from the data streams of
:mod:`mfdsl.core.streams` (synthetic Gaussians, teacher networks:
:mod:`~mfdsl.data.make`) or read from local image files in their real formats (MNIST,
Fashion-MNIST, CIFAR-10: :mod:`~mfdsl.data.images`).  Public: :func:`make_dataset`."""

from mfdsl.data.make import Dataset, image_sizes, make_dataset

__all__ = ["Dataset", "image_sizes", "make_dataset"]
