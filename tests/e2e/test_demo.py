"""`dmp demo` as a user runs it: the whole story, exit 0, no process left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_the_whole_story_and_leaves_nothing_running() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmp.cli.main", "demo", "--patients", "4", "--per-region", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    views = out.split("== region 53 (Bretagne) stops")
    assert len(views) == 2
    full, partial = views
    for region in ("11", "53", "84"):
        assert f"region {region}: answered (2 records)" in full
    assert re.search(r"region 53: (unavailable|deadline exceeded): ", partial)
    assert "region 11: answered (2 records)" in partial
    assert "clean shutdown" in out
    # The FHIR gateway for hospital software: its address and a curl that lists documents.
    gateway = re.search(r"== FHIR gateway for hospital software, as .*: (http://\S+/) \(pid", out)
    assert gateway is not None
    assert f"  curl -s '{gateway.group(1)}DocumentReference?patient.identifier=" in out
    assert re.search(r"-> a searchset Bundle of [1-9]\d* DocumentReferences", out)
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 5  # directory, 3 nodes, the FHIR gateway
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie is gone as far as the federation is concerned; anything else is left over.
        with open(f"/proc/{pid}/stat") as stat:
            assert stat.read().split()[2] == "Z", f"process {pid} left running"
