"""The package version: the C++ library's (CMake project version), checked by tests/python."""

__version__ = "0.1.0"
