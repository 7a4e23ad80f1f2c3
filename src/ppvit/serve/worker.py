"""One training process of a several-process job: ``ppvit train`` that dies with its torchrun launcher.

The launcher dies with the server (``PR_SET_PDEATHSIG``), but that setting does not pass to
the workers torchrun forks, which would train on after a killed server and hold the run
folder's lock against the next server's ``--resume``. Each worker sets it for itself, then
runs the CLI as ``python -m ppvit.cli`` would (a program run, not a layer import).
"""

from __future__ import annotations

import os
import runpy
import sys

from ppvit.serve.runners import die_with_parent


def main() -> None:
    launcher = os.getppid()
    die_with_parent()
    if os.getppid() != launcher:  # it died before the setting took: nothing would stop this worker
        sys.exit("ppvit worker: the launcher is gone")
    runpy.run_module("ppvit.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
