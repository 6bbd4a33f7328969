"""Build script. The package is pure Python for now; compiled kernels from csrc/ will be
built here with torch.utils.cpp_extension and ninja."""

from setuptools import setup

setup()
