"""Whether inductor can build CPU kernels here (it needs a C++ compiler), for the torch.compile tests."""

from __future__ import annotations

import os
import shutil

import pytest


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, g++, c++ or clang++), or None."""
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


needs_cpp_compiler = pytest.mark.skipif(
    cpp_compiler() is None, reason="inductor builds CPU kernels with a C++ compiler; none found"
)
