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
    before, scene = full.split("== Dr Hélène BERNARD (doctor, Cabinet médical Alésia")
    for region in ("11", "53", "84"):
        assert f"region {region}: answered (2 records)" in before
    # The e-prescription scene: written in 11, dispensed from 84, refused the same day.
    prescription = re.search(r"^prescription (RX-11-[0-9A-Z]{20}): signed", scene, re.M)
    assert prescription is not None, scene
    rx = prescription[1]
    assert f"prescription {rx} (held by region 11)" in scene
    assert "  signature    verified: signed by Dr Hélène BERNARD" in scene
    assert re.search(
        r"^dispensed: .* first by Mme Chloé MOREL .*: line 0 x1, line 1 x2$", scene, re.M
    )
    assert f"refused: FAILED_PRECONDITION ALREADY_DISPENSED: prescription {rx}" in scene
    history = scene.split("reads who accessed this prescription")[1]
    assert re.search(r"Mme Chloé MOREL .* region 11 +prescription-dispense .* OK$", history, re.M)
    assert re.search(r"M\. Hugo FAURE .* region 11 +prescription-dispense .* FAILED_PRECONDITION$",
                     history, re.M)  # fmt: skip
    assert re.search(r"region 53: (unavailable|deadline exceeded): ", partial)
    # Region 11 now also holds the prescription and its dispensation, linked by the id.
    assert "region 11: answered (4 records)" in partial
    assert f"dispensation  60593-1  Délivrance de l'ordonnance {rx}" in partial
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
