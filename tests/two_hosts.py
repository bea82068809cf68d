"""Launching one command as a two-host JAX job on this machine: two processes, gloo collectives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_two_hosts(argv: list[str], logs: Path, devices_each: int = 2, **env: str) -> list[str]:
    """Runs ``python argv…`` as processes 0 and 1 of a 2-process job with ``devices_each`` CPU devices
    each; asserts both succeed and returns their stdouts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
                  JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                  JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **env)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):  # output to files: a full pipe would stall a process the other one waits for
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, cwd=ROOT,
                                          env={**common, "JAX_PROCESS_ID": str(i)}))
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (logs / f"{i}.err").read_text()[-3000:]
    return [(logs / f"{i}.out").read_text() for i in range(2)]
