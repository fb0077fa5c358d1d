"""Datasets, image decoding and augmentation."""
