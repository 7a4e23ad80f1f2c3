"""The README's walkthrough, run as written: keygen, encrypt, train on ciphertext without the key, predict."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from ppvit import cli

README = Path(__file__).parents[2] / "README.md"


def walkthrough() -> list[list[str]]:
    """The commands of the README's walkthrough block, as argument lists without the leading ``ppvit``."""
    text = README.read_text()
    block = re.search(r"<!-- walkthrough.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README: the walkthrough block is gone"
    return [shlex.split(line)[1:] for line in block.group(1).splitlines() if line.startswith("ppvit ")]


def test_the_walkthrough_has_four_commands_in_order() -> None:
    assert [c[0] for c in walkthrough()] == ["keygen", "encrypt", "train", "predict"]


@pytest.mark.skipif(
    not Path(os.environ.get("PPVIT_WEIGHTS", "/nonexistent")).is_file(),
    reason="the walkthrough trains the default model: PPVIT_WEIGHTS names its weights (offline)",
)
def test_the_walkthrough_runs_as_written(
    tmp_path: Path, toy_dataset: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(toy_dataset, tmp_path / "my-photos")  # 32x32 PNGs in 4 classes; encrypt resizes them
    monkeypatch.chdir(tmp_path)
    for argv in walkthrough():
        assert cli.main(["-q", *argv]) == 0, argv
    lines = capsys.readouterr().out.strip().splitlines()[-32:]  # predict: one line per test image
    tested = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "my-photos" / "test").rglob("*.png"))
    assert sorted(line.split("\t")[0] for line in lines) == tested
    assert all(line.split("\t")[1].startswith("class") for line in lines)
