"""Settings that were accepted and then did nothing, something else, or hung: each refused when
the study loads, in one line naming the field and the fix (``kdablate dry-run`` exits 2)."""
from __future__ import annotations

import time

import pytest

from tests.test_study import assert_refused, write
from tests.test_trust import cli

BASE = """
base:
  data: {name: mnist1d, num_samples: 500}
  student: {name: mlp, hidden: 8, depth: 1}
  optim: {epochs: 4, batch_size: 32}
  teacher: {model: {name: cnn1d, channels: 8, depth: 2}, optim: {epochs: 1, batch_size: 32}}
seeds: [0]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - {name: kd, mass: teacher, structure: teacher, temperature: 4.0, alpha: 0.9}
  - {name: il, mass: {name: constant, eps: 0.2}, structure: {name: explanation, source: saliency}, temperature: 4.0, alpha: 0.9}
"""

CASES = [
    ("heatmaps of an arm that does not explain", "analysis: {heatmaps: [kd]}", "analysis.heatmaps[0]",
     "arm 'kd' has no explanation structure"),
    ("a pair of one arm", "analysis: {pairs: [[kd, kd]]}", "analysis.pairs[0]", "compares 'kd' with itself"),
    ("a warm-up longer than training", ("alpha: 0.9}", "alpha: 0.9, warmup_epochs: 5}"), "arms[1] (kd)",
     "warmup_epochs 5 is longer than the 4 epochs"),
    ("an explanation every more steps than a cell has", ("source: saliency}", "source: saliency, every: 500}"),
     "arms[2] (il)", "every 500 is more than the 44 steps of a cell"),
    ("milestones under a cosine schedule", ("optim: {epochs: 4, batch_size: 32}", "optim: {epochs: 4, batch_size: 32, milestones: [2]}"),
     "base.optim", "do nothing under schedule 'cosine'"),
    ("a milestone past the last epoch", ("optim: {epochs: 4, batch_size: 32}",
                                          "optim: {epochs: 4, batch_size: 32, schedule: multistep, milestones: [2, 4]}"),
     "base.optim", "milestone 4 is not inside the 4 epochs"),
    ("DKD with a mass and a structure", ("- {name: ce,", "- {name: dkd, objective: dkd, mass: teacher, structure: teacher, "
                                                          "temperature: 4.0, alpha: 1.0}\n  - {name: ce,"),
     "arms[0] (dkd)", "objective 'dkd' builds no soft target"),
    ("a temperature axis crossed with CE", "axes: {temperature: [2.0, 4.0]}", "axes",
     "cells 'ce[temperature=2.0]' and 'ce[temperature=4.0]' differ only in what they ignore"),
    ("a model too large to build", ("channels: 8, depth: 2}", "channels: 8, depth: 1000000000000}"), "base.teacher.model",
     "would have about 3.4e+14 parameters"),
]


@pytest.mark.parametrize("case,change,field,message", CASES, ids=[c[0] for c in CASES])
def test_refused_at_load(tmp_path, case, change, field, message):
    text = BASE + change + "\n" if isinstance(change, str) else BASE.replace(*change)
    start = time.perf_counter()
    assert_refused(write(tmp_path, text), field, message)
    assert time.perf_counter() - start < 30  # the too-large model is sized, never built


def test_dry_run_exits_2_in_one_line(tmp_path):
    path = write(tmp_path, BASE.replace("channels: 8, depth: 2}", "channels: 8, depth: 1000000000000}"))
    out = cli("dry-run", str(path), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "parameters" in out.stderr
