"""Runs that outgrow one machine: two torchrun agents on this machine as two nodes (c10d
rendezvous, gloo on the CPU) give the ``topk.json`` of a single process; killing one node
mid-run stops the other within seconds, naming the lost node, and the rerun resumes.

The killed-node test's rerun runs both nodes to their end and compares with one process, so the
plain two-node comparison (and the docs' multi-node page, ``tests/test_docs_blocks.py``) runs with
``ZFVIS_SLOW=1`` only; ``tests/test_mining.py::test_two_process_gloo_equals_one_process`` checks
that an uninterrupted distributed run leaves no rank's part file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zfvis.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "zfvis" / "assets" / "cifar10_sample"
MINE = ["-m", "zfvis", "mine", str(DATA), "--layers", "conv1", "--channels", "0-2", "--top", "3"]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="two torchrun agents with gloo: tested on Linux")
slow = pytest.mark.skipif(os.environ.get("ZFVIS_SLOW") != "1", reason="several processes: run with ZFVIS_SLOW=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _agents(out: Path, *extra: str) -> list[subprocess.Popen[str]]:
    """Two torchrun agents, one per node, as the docs' multi-node command starts them."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"zfvis{port}",
           *MINE, *extra, "-o", str(out)]
    return [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True) for _ in range(2)]


def _result(out: Path) -> dict:
    topk = json.loads((out / "topk.json").read_text())
    topk.pop("timings")
    return topk


def _finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    logs = []
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
        logs.append(log)
    return logs


def _kill_node(agent: subprocess.Popen[str]) -> None:
    """Kills a node: its torchrun agent and the worker it started (in a session of its own)."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    os.killpg(agent.pid, signal.SIGKILL)
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait()


#: One setting for every run here: pass 1 takes a few seconds, long enough to kill a node in it.
EXTRA = ("--limit", "200", "--batch-size", "1", "--state-every", "1", "--input-size", "64")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, single_thread) -> dict:  # noqa: ANN001
    """The ``topk.json`` of a single process (no torchrun): this one, on one thread as each worker."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main([*MINE[2:], *EXTRA, "--no-progress", "-o", str(out)]) == 0
    return _result(out)


@slow
def test_two_nodes_equal_one_process(tmp_path: Path, single: dict) -> None:
    _finish(_agents(tmp_path / "nodes", *EXTRA, "--no-progress"))
    assert _result(tmp_path / "nodes") == single
    assert not list((tmp_path / "nodes").glob("state.rank*"))


def test_a_killed_node_stops_the_other_and_the_rerun_resumes(tmp_path: Path, single: dict) -> None:
    out = tmp_path / "nodes"
    procs = _agents(out, *EXTRA, "--no-progress")
    t0 = time.monotonic()
    parts = [out / f"state.rank{r}-of-2.pt" for r in range(2)]
    while not all(p.exists() for p in parts):  # both nodes are in pass 1, with progress saved
        assert time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs), "pass 1 never began"
        time.sleep(0.02)
    workers = {p.pid: Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split() for p in procs}
    _kill_node(procs[1])
    killed_at = time.monotonic()
    log, _ = procs[0].communicate(timeout=120)
    stopped = time.monotonic() - killed_at
    assert procs[0].returncode != 0, log
    found = re.search(r"zfvis: error: lost contact with rank (\d) of 2, node (\d) \(host ", log)
    assert found and found[1] == found[2], log[-3000:]  # the lost node named (rank = node here)
    assert "topk.json" not in os.listdir(out)  # it stopped in pass 1
    assert stopped < 20, stopped
    assert workers  # (both nodes had started their worker)
    logs = _finish(_agents(out, *EXTRA))  # with progress: it says where it resumes
    assert any("resuming pass 1 from" in log for log in logs), logs
    assert _result(out) == single
