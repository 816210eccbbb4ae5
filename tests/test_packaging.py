"""The wheel built from the working tree holds the package, its patches and the shipped configs, and runs installed;
the editable install finds the shipped configs too.

The wheel is built offline (no index, no build isolation: the environment's setuptools) from a copy of the tree, the
files git tracks or would track, so neither build/ nor egg-info lands in the checkout and no stale build output can
slip into the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest

import mindspeed_rl_r3
from mindspeed_rl_r3.shipped_configs import shipped_config_names, shipped_configs_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "grpo_qwen3_30b_a3b_lora_r3_aqn"
WHERE = "import json, mindspeed_rl_r3, mindspeed_rl_r3.shipped_configs as s; "
WHERE += "print(json.dumps([mindspeed_rl_r3.__file__, str(s.shipped_configs_dir())]))"


def _run(args: list[str], cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _copy_working_tree(dst: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # tracked files deleted in the working tree are listed too
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """``(source copy, wheel)``."""
    pytest.importorskip("setuptools")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know which files the working tree holds")
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    _copy_working_tree(src)
    run = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                str(src)], cwd=tmp)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("mindspeed_rl_r3-*.whl")
    return src, wheel


def test_wheel_holds_every_module_the_patches_and_the_shipped_configs(built):
    src, wheel = built
    members = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src).as_posix() for p in (src / "mindspeed_rl_r3").rglob("*.py")}
    patches = {f"mindspeed_rl_r3/patches/{p.name}" for p in (src / "patches").glob("*.py")}  # the top-level folder
    configs = {f"mindspeed_rl_r3/configs/{p.relative_to(src / 'configs').as_posix()}"
               for p in (src / "configs").rglob("*.yaml")}  # fmt: skip
    assert "mindspeed_rl_r3/patches/patch_set.py" in patches and f"mindspeed_rl_r3/configs/{CONFIG}.yaml" in configs
    assert "mindspeed_rl_r3/configs/model/qwen3_30b_a3b.yaml" in configs  # the defaults list's subfolders too
    missing = sorted((modules | patches | configs) - members)
    assert not missing, f"not in the wheel (a subpackage missing from pyproject.toml's packages?): {missing}"


def test_wheel_metadata_keeps_torch_unpinned_and_the_console_script(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        info = f"mindspeed_rl_r3-{mindspeed_rl_r3.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        scripts = archive.read(f"{info}/entry_points.txt").decode()
    assert f"Version: {mindspeed_rl_r3.__version__}\n" in metadata
    assert "Requires-Dist: torch>=2.1\n" in metadata and "Requires-Python: >=3.10\n" in metadata
    assert "mindspeed-rl-r3 = mindspeed_rl_r3.cli.main:main" in scripts


def test_installed_wheel_plans_a_shipped_config_from_outside_the_checkout(built, tmp_path):
    pytest.importorskip("hydra")
    _, wheel = built
    site = tmp_path / "site"
    run = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    where = _run([sys.executable, "-c", WHERE], cwd=tmp_path, pythonpath=str(site))
    assert where.returncode == 0, where.stderr
    module, configs = map(Path, json.loads(where.stdout))
    # from the wheel, not from the editable install of this checkout
    assert module.is_relative_to(site) and configs == site / "mindspeed_rl_r3" / "configs"
    plan = _run([sys.executable, "-m", "mindspeed_rl_r3.cli.main", "plan", CONFIG, "--json"], tmp_path, str(site))
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["ok"] is True


def test_editable_install_plans_a_shipped_config_from_outside_the_checkout(tmp_path):
    pytest.importorskip("hydra")
    # the installed metadata, not the egg-info that building leaves in the checkout (on sys.path under pytest)
    site_dirs = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    installed = next(distributions(name="mindspeed-rl-r3", path=site_dirs), None)
    direct_url = json.loads((installed and installed.read_text("direct_url.json")) or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("mindspeed-rl-r3 is not installed editable in this environment")
    where = _run([sys.executable, "-c", WHERE], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, configs = map(Path, json.loads(where.stdout))
    assert module.is_relative_to(ROOT / "mindspeed_rl_r3") and configs == ROOT / "configs"
    plan = _run([sys.executable, "-m", "mindspeed_rl_r3.cli.main", "plan", CONFIG, "--json"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["ok"] is True


def test_shipped_configs_resolve_to_the_checkout_folder():
    assert shipped_configs_dir() == ROOT / "configs"
    assert shipped_config_names() == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert CONFIG in shipped_config_names()
