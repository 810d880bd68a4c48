"""Test helpers: run the CLI in a subprocess, build throwaway plugin distributions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def htfl(*args, env_extra=None, cwd=None, timeout=300):
    """Run ``htfl`` as a user would; returns the CompletedProcess."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "htfl_plugins.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def readme_plugin_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```\s*<!-- /plugin-example -->",
                      text, re.S)
    assert block, "README lost its plugin example"
    return block.group(1)


def make_distribution(site: Path, dist: str, module: str, code: str, entry_points: dict) -> Path:
    """Write ``module/__init__.py`` and a ``dist-info`` with the given ``htfl`` entry
    points into ``site``, as pip would install a wheel."""
    pkg = site / module
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(code)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[htfl]\n{lines}\n")
    (info / "RECORD").write_text("")
    return site


def parties(cfg):
    """(setup, clients, server) of a run config, built as the loop builds them."""
    from htfl_plugins.engine.loop import prepare
    from htfl_plugins.plugins import get_plugins

    s = prepare(cfg, get_plugins())
    clients, server = s.parties()
    return s, clients, server


def one_round(clients, server, r, selected=None):
    """One training round through the loop's own step; returns (downloads, uploads)."""
    from htfl_plugins.engine.executors import SequentialExecutor
    from htfl_plugins.engine.loop import train_round

    selected = list(range(len(clients))) if selected is None else selected
    downloads, uploads, _ = train_round(type(server).__name__, server, clients,
                                        SequentialExecutor(), r, selected)
    return downloads, uploads
