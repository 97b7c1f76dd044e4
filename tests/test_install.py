"""The package imports its extension and its Triton kernels after `pip install .` and `pip install -e .`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import json, slmkern, slmkern._C, slmkern.kernels, slmkern.benchmarks; "
         "print(json.dumps({'file': slmkern.__file__, 'kernels': slmkern.kernels.__file__, "
         "'isa': slmkern._C.detected_isa()}))")


def run_probe(cwd: Path, extra_path: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_imports_from_anywhere(tmp_path):
    try:
        dist = metadata.distribution("slmkern")
    except metadata.PackageNotFoundError:
        pytest.skip("slmkern is not pip-installed in this environment")
    direct = dist.read_text("direct_url.json")
    if not direct or not json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("slmkern is installed, but not with pip install -e")
    got = run_probe(tmp_path)
    assert Path(got["file"]).resolve().parent == ROOT / "slmkern"
    assert Path(got["kernels"]).resolve().parent == ROOT / "kernels"


@pytest.mark.slow
def test_regular_install_into_a_fresh_target(tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
           "--target", str(target), str(ROOT)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    got = run_probe(tmp_path, extra_path=str(target))
    assert Path(got["file"]).resolve().is_relative_to(target.resolve())
    assert Path(got["kernels"]).resolve().is_relative_to(target.resolve())
