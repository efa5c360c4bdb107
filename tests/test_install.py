"""A non-editable install (`pip install .`, a wheel) works away from the checkout: it carries the named configs
(the repository's top-level `configs/`, installed as `bmgpt_jax/configs/`) and the converters' command line
(`python -m bmgpt_jax.convert`, `bmgpt-convert`), which a checkout runs as `convert_weights.py`."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def can_build_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels itself; an older one needs the `wheel` package."""
    return any(importlib.util.find_spec(m) for m in ("setuptools.command.bdist_wheel", "wheel"))


@pytest.mark.skipif(not can_build_wheels_offline(), reason="no wheel builder without build isolation (network)")
def test_an_installed_package_finds_its_configs_and_converter(tmp_path):
    src, site, away = tmp_path / "src", tmp_path / "site", tmp_path / "away"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("bmgpt_jax", "configs"):            # a copy: pip builds in the source tree (build/, egg-info)
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    shutil.copy(REPO / "setup.py", src)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, cwd=tmp_path, env=env, timeout=300)
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}    # the installed copy only, run outside the checkout

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, cwd=away, env=env, timeout=300)

    shown = run(sys.executable, "-c", "from bmgpt_jax import config\n"
                "for name in ('tiny', 'biomedgpt_10b_align', 'configs/tiny_align.yaml'):\n"
                "    print(config.resolve_path(name)); assert config.read_yaml(name)['model']")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.split() == [str(site / "bmgpt_jax" / "configs" / f) for f in
                                    ("tiny.yaml", "biomedgpt_10b_align.yaml", "tiny_align.yaml")]
    for command in ([sys.executable, "-m", "bmgpt_jax.convert"], [str(site / "bin" / "bmgpt-convert")]):
        helped = run(*command, "--help")
        assert helped.returncode == 0 and "hf_llama" in helped.stdout, (command, helped.stderr[-2000:])
        refused = run(*command, "to_openbiomed", "a", "b", "--step", "1")
        assert refused.returncode == 2, (command, refused.stderr[-2000:])
        assert refused.stderr.strip().splitlines()[-1].endswith("to_openbiomed does not take --step "
                                                                "(its options: --dtype, --check)")
