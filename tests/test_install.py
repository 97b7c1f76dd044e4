"""The package imports its extension and its Triton kernels after `pip install .` and `pip install -e .`."""
from __future__ import annotations

import importlib.util
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


# Our top-level kernels/ folder is installed as slmkern.kernels. Run from the repo root it must never
# be importable as a top-level `kernels`: transformers 5.x imports Hugging Face's `kernels` package,
# and ours would shadow it (the Makefile runs every Python with -P; pytest uses importlib mode).
SHADOW_PROBE = ("import importlib.util, json, slmkern.kernels; spec = importlib.util.find_spec('kernels'); "
                "print(json.dumps({'kernels': spec and spec.origin, 'ours': slmkern.kernels.__file__}))")


def test_top_level_kernels_is_never_our_folder_from_the_repo_root():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    out = subprocess.run([sys.executable, "-P", "-c", SHADOW_PROBE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ours = Path(got["ours"]).resolve().parent  # slmkern.kernels still imports: editable or regular install
    assert ours == ROOT / "kernels" or ours.parts[-2:] == ("slmkern", "kernels"), ours
    here = importlib.util.find_spec("kernels")  # this pytest process (importlib mode)
    for origin in (got["kernels"], here and here.origin):
        if origin is None:  # HF kernels not installed (transformers 4.x): nothing may stand in for it
            continue
        assert not Path(origin).resolve().is_relative_to(ROOT / "kernels"), f"`import kernels` is our {origin}"
        assert "site-packages" in Path(origin).parts, origin


def test_hf_kernels_resolves_to_site_packages_when_transformers_needs_it():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x does not import Hugging Face's kernels package")
    import kernels
    assert not Path(kernels.__file__).resolve().is_relative_to(ROOT / "kernels"), kernels.__file__
    assert "site-packages" in Path(kernels.__file__).parts, kernels.__file__
    from kernels import CUDAProperties  # noqa: F401  (what transformers' hub_kernels imports; ours has none)
