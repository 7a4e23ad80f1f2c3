"""The encrypt worker pool in a process that has used torch's thread pool (as one that trained)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CODE = """
import sys, torch
from ppvit.crypto.ciphers import BlockCipher
from ppvit.crypto.keys import Key
from ppvit.data.encrypt import encrypt_collection
torch.set_num_threads(2)
a = torch.randn(1500, 1500)
for _ in range(3):
    a @ a  # the parent's OpenMP pool, busy
torch.nn.functional.interpolate(torch.rand(8, 3, 64, 64), size=(224, 224), mode="bicubic")
s = encrypt_collection(sys.argv[1], sys.argv[2], BlockCipher(Key(bytes(32)), "shuffle", 16), size=224, workers=2,
                       progress=False)
print(s.written, len(s.failed))
"""


def test_workers_of_a_process_that_used_torch_threads_finish(tmp_path: Path) -> None:
    """A forked worker entering the OpenMP pool its parent used can deadlock (seen: a 40-minute hang)."""
    for c in range(2):
        (tmp_path / "src" / "train" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            img = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "src" / "train" / f"c{c}" / f"{i}.png")
    run = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "src"), str(tmp_path / "dst")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["24", "0"]
