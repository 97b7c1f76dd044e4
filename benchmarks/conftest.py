"""Collect bench_*.py (the pytest-benchmark suites) when pytest is pointed at benchmarks/.

tests/conftest.py is separate: nothing here is shared with the test suite.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
