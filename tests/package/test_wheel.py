"""The installable package: a wheel built from this tree holds every subpackage, the license and the
command, under the one version number; installed alone, its cheap verbs run."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ppvit

ROOT = Path(ppvit.__file__).parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("ppvit is installed, not a source tree")
    out = tmp_path_factory.mktemp("wheel")
    build = ROOT / "build"
    had_build = build.exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    if not had_build:  # setuptools' scratch folder, not ours to leave behind
        subprocess.run(["rm", "-rf", str(build)], check=False)
    (found,) = out.glob("ppvit-*.whl")
    return found


def test_the_wheel_holds_every_subpackage_the_license_and_the_command(wheel: Path) -> None:
    assert wheel.name.startswith(f"ppvit-{ppvit.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    source = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "ppvit").rglob("*.py")}
    assert source <= set(names)
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ppvit = ppvit.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_installed_wheel_runs_its_cheap_verbs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's ppvit, this environment's dependencies
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import ppvit, sys; print(ppvit.__file__); sys.argv = ['ppvit', '--version']; "
            "from ppvit.cli import main; main()",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.splitlines()[0].startswith(str(target)), run.stderr
    assert f"ppvit {ppvit.__version__}" in run.stdout
    key = tmp_path / "k.key"
    run = subprocess.run(
        [sys.executable, "-c", f"from ppvit.cli import main; raise SystemExit(main(['keygen', {str(key)!r}]))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and key.stat().st_mode & 0o777 == 0o600
