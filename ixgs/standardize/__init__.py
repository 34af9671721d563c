"""Standardization: make real radiographs look like the attenuation line integrals the reconstruction expects.

``classical`` is the dependency-free method (flat field / -log, CLAHE, bone emphasis); learned methods
live beside it in this package.
"""
from .classical import ClassicalSettings, standardize_image, standardize_scan

__all__ = ["ClassicalSettings", "standardize_image", "standardize_scan"]
