"""The environment of a child Python process started by a test.

The child must import the same slmkern as this process and never the repo's top-level ``kernels/``
folder as ``kernels`` (it would shadow Hugging Face's package, which transformers 5.x imports).
So: safe-path mode (no cwd or script dir on ``sys.path``), and the slmkern package root goes on
``PYTHONPATH`` only when it is a built tree such as ``build/asan/lib`` (``make sanitize``): the
repo root itself, where an editable install already finds slmkern, never does.
"""
from __future__ import annotations

import os
from pathlib import Path

import slmkern


def child_env(*extra_paths: str | Path, drop: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONSAFEPATH"] = "1"
    paths = [str(p) for p in extra_paths]
    pkg_root = Path(slmkern.__file__).resolve().parents[1]
    if not (pkg_root / "kernels").is_dir():
        paths.append(str(pkg_root))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(overrides)
    return env
