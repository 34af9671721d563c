"""IXGS engine: sparse-view 3D reconstruction from arbitrarily posed X-rays by radiative Gaussians.

No Slicer, no Qt: torch, numpy and SimpleITK only. World frame LPS, millimetres; attenuation in 1/mm.
"""
__version__ = "0.1.0"
