"""A short kill -9 torture (``make torture`` runs 20 trials): one kill while the store is being
created, one in the middle of the study; each rerun ends with one FINISHED run per cell."""
from __future__ import annotations

from tests.torture import trial


def test_kill_during_store_creation_then_rerun_is_clean(tmp_path):
    when, problems = trial(tmp_path / "fresh", during_creation=True, delay=0.0)
    assert when == "during store creation" and problems == []


def test_kill_mid_study_then_rerun_is_clean(tmp_path):
    when, problems = trial(tmp_path / "mid", during_creation=False, delay=12.0)
    assert problems == [], (when, problems)
