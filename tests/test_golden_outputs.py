"""The analysis outputs on fixed inputs are the ones the code made before the package split."""
from __future__ import annotations

import json

from support.golden_outputs import REPO, fingerprint_outputs


def test_outputs_match_the_recorded_fingerprints(tmp_path):
    recorded = json.loads((REPO / "tests" / "data" / "golden_outputs.json").read_text())
    made = fingerprint_outputs(tmp_path)
    differing = [f"{run}/{part}/{key}" for run in recorded for part in recorded[run]
                 if isinstance(recorded[run][part], dict)
                 for key in recorded[run][part]
                 if made[run].get(part, {}).get(key) != recorded[run][part][key]]
    assert made == recorded, f"outputs changed: {differing or 'chart files or new keys'}"
