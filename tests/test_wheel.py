"""The built wheel is complete and runs on its own: every package module and every conf/ yaml is inside it, and an
entry point installed from it into a fresh environment (no source tree on the path) finds its configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF_DIR, ROOT

PACKAGE = ROOT / "unclip"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (an in-tree build would leave build/ in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(PACKAGE, src / "unclip", ignore=ignore)
    shutil.copytree(CONF_DIR, src / "conf", ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (path,) = dist.glob("unclip-*.whl")
    return path


def test_wheel_holds_every_module_config_and_entry_point(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    configs = {"unclip/conf/" + p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")}
    assert len(configs) > 20 and "unclip/conf/train.yaml" in configs
    assert sorted(modules - names) == [], "a package is missing from [tool.setuptools] packages"
    assert sorted(configs - names) == [], "a config is missing from the wheel"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("unclip-train", "unclip-eval", "unclip-sample", "unclip-embed", "unclip-demo"):
        assert f"{script} = " in scripts


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_env_runs_from_any_folder(wheel, tmp_path):
    # --system-site-packages: torch & co. come from this machine; pip too, so the venv needs none of its own.
    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean["HOME"] = str(tmp_path / "home")  # caches (demo shards, torch) away from the user's
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*cmd: str) -> str:
        proc = subprocess.run([str(c) for c in cmd], cwd=work, env=clean, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    # --ignore-installed: an editable unclip of the same version may already sit in the system site-packages.
    run(python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", wheel)
    where = run(python, "-c", "import unclip.config as c; print(c.__file__); print(c.conf_dir())").split()
    assert Path(where[0]).is_relative_to(env_dir) and Path(where[1]).is_relative_to(env_dir), where
    assert "experiment: " in run(bin_dir / "unclip-train", "--help")
    report = json.loads(run(bin_dir / "unclip-train", "stage=prior", "experiment=demo_prior_tiny", "dry_run=true",
                            "data=webdataset", "data.train_shards=none.tar", "data.val_shards=none.tar",
                            "logger=none").strip().splitlines()[-1])
    assert report["stage"] == "prior" and report["params"] > 0
    assert "num_samples: 1000" in run(bin_dir / "unclip-eval", "--cfg", "job")
