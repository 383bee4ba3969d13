"""Fixtures for the Python package's tests: the package from python/ (unless installed), liblim
from LIM_LIBRARY (ctest sets it to the build's), and a fresh segment per test."""

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if os.environ.get("LIM_TEST_INSTALLED") != "1":
    sys.path.insert(0, str(REPO / "python"))

import lim  # noqa: E402


@pytest.fixture
def seg_name():
    name = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    lim.Segment.remove(name)


@pytest.fixture
def seg(seg_name):
    s = lim.Segment.open_or_create(seg_name)
    yield s
    s.close()


def tool(env_name: str) -> str:
    path = os.environ.get(env_name, "")
    if not path or not os.path.exists(path):
        pytest.skip(f"{env_name} is not set (run through ctest)")
    return path
