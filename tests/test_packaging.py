"""The built wheel carries what an installed predet needs: shipped configs, py.typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from predet.config import ConfigError, load_yaml, shipped_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, predet
from pathlib import Path
assert Path(predet.__file__).is_relative_to(sys.argv[1]), predet.__file__
from importlib.resources import files
assert (files("predet") / "py.typed").is_file()
from predet.config import shipped_configs
from predet.tools.demo import FINETUNE_CONFIG, PRETRAIN_CONFIG
from predet.finetune import load_finetune_config
from predet.pretrain import load_pretrain_config
load_pretrain_config(PRETRAIN_CONFIG); load_finetune_config(FINETUNE_CONFIG)
names = shipped_configs()
for name in names:
    (load_pretrain_config if name.startswith("pretrain/") else load_finetune_config)(name)
print(len(names))
"""


def test_shipped_configs_by_name_and_by_documented_path():
    names = shipped_configs()
    assert "finetune/fashiondet_r18_cpu" in names and "pretrain/r50_fpn_gpu" in names
    assert load_yaml("finetune/fashiondet_r18_cpu") == load_yaml("configs/finetune/fashiondet_r18_cpu.yaml")
    assert shipped_config("finetune/no_such") is None
    with pytest.raises(ConfigError, match="finetune/fashiondet_r18_cpu"):  # the error lists what exists
        load_yaml("finetune/no_such")


def test_wheel_installs_with_configs_and_py_typed(tmp_path):
    src = tmp_path / "src_copy"  # build from a copy: no build/ or egg-info left in the checkout
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True)
    (wheel,) = wheels.glob("predet-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    assert "predet/py.typed" in members and "predet/configs/finetune/fashiondet_r18_cpu.yaml" in members
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    # run from an empty folder with only the installed wheel first on the path
    out = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(shipped_configs())
