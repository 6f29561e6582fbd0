"""scripts/setup.sh refuses a first install on a disk too full for torch, before writing anything,
instead of letting pip stop half-way with "No space left on device"."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _fake_df(bin_dir: Path, free_mb: int) -> None:
    """A `df -Pm` that reports `free_mb` available: the one way to show a full disk to a test."""
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(
        "#!/bin/sh\n"
        'echo "Filesystem 1048576-blocks Used Available Capacity Mounted on"\n'
        f'echo "/dev/fake 100000 {100000 - free_mb} {free_mb} 99% /"\n'
    )
    df.chmod(df.stat().st_mode | stat.S_IXUSR)


@pytest.mark.skipif(not FMNIST.exists(), reason="setup.sh would first install Debian's Fashion-MNIST")
def test_a_first_install_on_a_full_disk_stops_before_writing_and_says_how_much_it_needs(tmp_path):
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", project / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    _fake_df(tmp_path / "bin", free_mb=900)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("TASKFOLD_SETUP_NEED_MB", None)

    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "900 MB free" in done.stderr and "6500 MB" in done.stderr and str(project) in done.stderr
    assert sorted(p.name for p in project.iterdir()) == ["pyproject.toml", "scripts"]
