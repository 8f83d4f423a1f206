"""Study files: expansion into cells, and clean one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdablate.study import StudyError, load_study

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
base:
  data: {name: mnist1d, num_samples: 500}
  optim: {epochs: 1}
seeds: [0, 1]
arms:
  - {name: ce, mass: none, alpha: 0.0}
  - name: "{mass}+{structure}"
    temperature: 4
    alpha: 0.9
    grid:
      mass: [{name: constant, eps: 0.4}, teacher]
      structure: [uniform, teacher]
analysis: {baseline: ce, reference: [ce]}
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_components_study_has_the_required_arms_and_seeds():
    study = load_study(ROOT / "studies" / "components.yaml")
    arms = study.arms()
    assert {"ce", "ls"} <= set(arms)
    factorial = {f"{m}+{s}" for m in ("constant", "teacher") for s in ("uniform", "permuted", "teacher")}
    assert factorial <= set(arms)
    assert len(study.config.seeds) >= 3
    kd = [c for c in study.cells if c.arm in factorial]
    assert {c.knowledge.temperature for c in kd} == {4.0}
    ls = next(c for c in study.cells if c.arm == "ls")
    assert ls.knowledge.temperature == 1.0 and ls.knowledge.mass.name == "constant"
    assert len({c.config_hash() for c in study.cells}) == len(study.cells)


def test_smoke_study_has_the_same_shape_as_components():
    smoke, comp = load_study(ROOT / "studies" / "smoke.yaml"), load_study(ROOT / "studies" / "components.yaml")
    assert smoke.arms() == comp.arms()


def test_grid_expands_with_name_template(tmp_path):
    study = load_study(write(tmp_path, GOOD))
    assert study.arms() == ["ce", "constant+uniform", "constant+teacher", "teacher+uniform", "teacher+teacher"]
    assert len(study.cells) == 10
    c = next(c for c in study.cells if c.arm == "constant+teacher")
    assert c.knowledge.mass.params == {"eps": 0.4} and c.knowledge.temperature == 4.0


def test_axes_cross_every_arm_and_reach_any_field(tmp_path):
    text = GOOD.replace("analysis: {baseline: ce, reference: [ce]}", "axes: {optim.lr: [0.1, 0.01]}")
    study = load_study(write(tmp_path, text))
    assert len(study.cells) == 20
    assert {c.optim.lr for c in study.cells} == {0.1, 0.01}


def test_hash_ignores_spelled_out_defaults(tmp_path):
    a = load_study(write(tmp_path, GOOD, "a.yaml"))
    b = load_study(write(tmp_path, GOOD.replace("{name: mnist1d, num_samples: 500}",
                                                "{name: mnist1d, num_samples: 500, val_fraction: 0.1}"), "b.yaml"))
    assert [c.config_hash() for c in a.cells] == [c.config_hash() for c in b.cells]


BAD = [
    ("unknown mass", ("mass: none, alpha", "mass: nothing, alpha"), "arms[0].mass", "unknown mass 'nothing'; known:"),
    ("unknown structure in grid", ("structure: [uniform, teacher]", "structure: [uniform, teachr]"),
     "arms[1]", "unknown structure 'teachr'"),
    ("unknown component param", ("eps: 0.4", "epsilon: 0.4"), "arms[1]", "no parameter 'epsilon'; allowed: eps"),
    ("unknown model", ("optim: {epochs: 1}", "optim: {epochs: 1}\n  student: {name: resnet999}"),
     "base.student", "unknown model 'resnet999'"),
    ("unknown dataset", ("name: mnist1d", "name: mnist2d"), "base.data", "unknown dataset 'mnist2d'"),
    ("temperature <= 0", ("temperature: 4", "temperature: 0"), "arms[1].temperature", "greater than 0"),
    ("alpha > 1", ("alpha: 0.9", "alpha: 1.5"), "arms[1].alpha", "less than or equal to 1"),
    ("alpha wrong type", ("alpha: 0.9", "alpha: high"), "arms[1].alpha", "valid number"),
    ("empty grid axis", ("structure: [uniform, teacher]", "structure: []"), "arms[1].grid", "axis 'structure' is empty"),
    ("duplicate arm", ("- {name: ce, mass: none, alpha: 0.0}", "- {name: ce, mass: none, alpha: 0.0}\n  - {name: ce}"),
     "", "duplicate arm name 'ce'"),
    ("no seeds", ("seeds: [0, 1]", "seeds: []"), "seeds", "at least 1"),
    ("unknown top-level field", ("seeds: [0, 1]", "seeds: [0, 1]\nsedes: [3]"), "sedes", "unknown field"),
    ("unknown optim field", ("optim: {epochs: 1}", "optim: {epoch: 1}"), "base.optim.epoch", "unknown field"),
    ("negative epochs", ("optim: {epochs: 1}", "optim: {epochs: -1}"), "base.optim.epochs", "greater than 0"),
    ("bad analysis baseline", ("baseline: ce", "baseline: kd"), "analysis.baseline", "no arm named 'kd'"),
    ("template with unknown key", ('"{mass}+{structure}"', '"{mass}+{temp}"'), "arms[1].name", "'temp'"),
    ("teacher needed but null", ("optim: {epochs: 1}", "optim: {epochs: 1}\n  teacher: null"), "arms[1]",
     "base.teacher is null"),
    ("bad yaml", ("seeds: [0, 1]", "seeds: [0, 1"), "line", "invalid YAML"),
    ("seed not an int", ("seeds: [0, 1]", "seeds: [0, one]"), "seeds[1]", "valid integer"),
    ("repeated seeds", ("seeds: [0, 1]", "seeds: [1, 1]"), "seeds", "seeds repeat"),
    ("eps out of range", ("eps: 0.4", "eps: 1.4"), "arms[1]", "eps must be in [0, 1]"),
    ("component param wrong type", ("eps: 0.4", "eps: lots"), "arms[1]", "must be float, got str"),
    ("model param unknown", ("optim: {epochs: 1}", "optim: {epochs: 1}\n  student: {name: mlp, width: 3}"),
     "base.student", "no parameter 'width'; allowed: hidden, depth"),
    ("model param wrong type", ("optim: {epochs: 1}", "optim: {epochs: 1}\n  student: {name: mlp, hidden: 1.5}"),
     "base.student", "must be int, got float"),
    ("dataset param out of range", ("num_samples: 500", "num_samples: 5"), "base.data", "num_samples must be >= 100"),
    ("lr not positive", ("optim: {epochs: 1}", "optim: {epochs: 1, lr: 0}"), "base.optim.lr", "greater than 0"),
    ("unknown schedule", ("optim: {epochs: 1}", "optim: {epochs: 1, schedule: step}"), "base.optim.schedule",
     "'cosine', 'constant' or 'multistep'"),
    ("unknown report rule", ("optim: {epochs: 1}", "optim: {epochs: 1}\n  report: best_test"), "base.report",
     "'last' or 'best_val'"),
    ("unknown arm field", ("- {name: ce, mass: none, alpha: 0.0}", "- {name: ce, mass: none, alpha: 0.0, temp: 2}"),
     "arms[0].temp", "unknown field"),
    ("arm without name", ("- {name: ce, mass: none, alpha: 0.0}", "- {mass: none, alpha: 0.0}"), "arms[0].name",
     "Field required"),
    ("empty arms", ("arms:\n  - {name: ce, mass: none, alpha: 0.0}\n  - name: \"{mass}+{structure}\"",
                    "arms: []\nx:\n  - name: \"{mass}+{structure}\""), "arms", "at least 1"),
    ("unknown objective", ("- {name: ce, mass: none, alpha: 0.0}", "- {name: ce, objective: dkdd, alpha: 0.0}"),
     "arms[0].objective", "unknown objective 'dkdd'"),
    ("negative warm-up", ("- {name: ce, mass: none, alpha: 0.0}", "- {name: ce, warmup_epochs: -1}"),
     "arms[0].warmup_epochs", "greater than or equal to 0"),
    ("unknown explanation source", ("structure: [uniform, teacher]", "structure: [{name: explanation, source: lime}]"),
     "arms[1]", "unknown explanation 'lime'"),
    ("bad similarity", ("structure: [uniform, teacher]", "structure: [{name: explanation, similarity: dot}]"),
     "arms[1]", "similarity must be one of cosine, pearson, neg_l2"),
    ("axis over an unknown field", ("analysis: {baseline: ce, reference: [ce]}", "axes: {optim.lrr: [0.1]}"),
     "optim.lrr", "unknown field"),
    ("empty top-level axis", ("analysis: {baseline: ce, reference: [ce]}", "axes: {temperature: []}"), "axes",
     "axis 'temperature' is empty"),
    ("bad reference arm", ("reference: [ce]", "reference: [cee]"), "analysis.reference[0]", "no arm named 'cee'"),
    ("bad study name", ("seeds: [0, 1]", "seeds: [0, 1]\nname: 'a b/c'"), "name", "should match pattern"),
    ("arm override of unknown path", ("- {name: ce, mass: none, alpha: 0.0}",
                                      "- {name: ce, mass: none, alpha: 0.0, set: {optim.momentun: 0.5}}"),
     "momentun", "unknown field"),
]


@pytest.mark.parametrize("case,edit,field,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_study_is_rejected_with_file_and_field(tmp_path, case, edit, field, message):
    assert edit[0] in GOOD, case
    assert_refused(write(tmp_path, GOOD.replace(edit[0], edit[1], 1)), field, message)


def assert_refused(path: Path, field: str, message: str) -> None:
    """``path`` is refused at load in one line that starts with the file and names ``field``."""
    with pytest.raises(StudyError) as err:
        load_study(path)
    text = str(err.value)
    assert text.startswith(str(path)) and "\n" not in text
    assert field in err.value.field and message in text, text


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", ""])
def test_study_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(StudyError, match="must be a YAML mapping"):
        load_study(write(tmp_path, text))


def test_missing_study_lists_known_ones(tmp_path):
    with pytest.raises(StudyError, match="no such study file; known studies: components"):
        load_study(ROOT / "studies" / "nope.yaml")


def test_cli_reports_bad_input_in_one_line_with_exit_2(tmp_path):
    path = write(tmp_path, GOOD.replace("alpha: 0.9", "alpha: 2"))
    out = subprocess.run([sys.executable, "-m", "kdablate.cli", "run", str(path)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert str(path) in out.stderr and "arms[1].alpha" in out.stderr


def test_dry_run_lists_cells_without_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdablate.cli", "dry-run", str(write(tmp_path, GOOD))],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "5 arms x 2 seeds = 10 cells" in out.stdout and out.stdout.count("teacher+teacher") == 2
    assert not (tmp_path / "mlruns.db").exists()


def test_introspective_study_has_every_method_the_paper_compares():
    study = load_study(ROOT / "studies" / "introspective.yaml")
    arms = set(study.arms())
    assert {"ce", "ls", "cp", "tfkd_reg", "dml", "kd", "dkd", "il_cam", "il_saliency", "il_grad_input"} <= arms
    assert len(study.config.seeds) >= 3
    il = next(c for c in study.cells if c.arm == "il_saliency")
    assert il.knowledge.structure.params["source"] == "saliency" and il.knowledge.mass.name != "teacher"


def test_template_reads_plugin_parameters():
    from kdablate.study import arm_name

    combo = {"structure": {"name": "explanation", "source": "cam"}, "temperature": 4.0}
    assert arm_name("il_{structure_source}", combo) == "il_cam[temperature=4.0]"
    assert arm_name("x", combo) == "x[structure=explanation,temperature=4.0]"


def test_hash_survives_new_defaulted_fields(tmp_path, monkeypatch):
    """Adding a field or plugin parameter with a default must not invalidate finished cells."""
    import dataclasses as dc

    from kdablate.components import MASSES
    from kdablate.config import canonical

    study = load_study(write(tmp_path, GOOD))
    before = [c.config_hash() for c in study.cells]
    cell = study.cells[-1]
    assert "optim" in canonical(cell) and "mass" in canonical(cell)["knowledge"]
    params = MASSES.get("constant").Params
    extended = dc.make_dataclass("Params", [("eps", float, dc.field(default=0.1)), ("new_knob", int, dc.field(default=3))],
                                 frozen=True)
    monkeypatch.setattr(MASSES.get("constant"), "Params", extended)
    after = [c.config_hash() for c in load_study(write(tmp_path, GOOD, "b.yaml")).cells]
    monkeypatch.setattr(MASSES.get("constant"), "Params", params)
    assert after == before


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_validates(path, tmp_path, monkeypatch):
    """Every file in studies/ loads; image studies find their data under ./data (written here)."""
    from kdablate.data.fake import write_cifar
    from tests.datafiles import write_shipped_checkpoints

    write_cifar(tmp_path / "data", "cifar100", 400, 100)
    write_shipped_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    study = load_study(path)
    assert study.cells and len({c.config_hash() for c in study.cells}) == len(study.cells)


def test_the_shipped_studies_cell_hashes_stay_what_they_were():
    """A cell's hash names its runs in every user's store: a refactor that changes one orphans them.
    tests/golden/cell_hashes.json holds the hashes of the shipped studies that load without data
    files, as commit 359250e computed them (the CIFAR studies need their data to load)."""
    import json

    golden = json.loads((Path(__file__).parent / "golden" / "cell_hashes.json").read_text())
    studies = Path(__file__).resolve().parents[1] / "studies"
    for name, hashes in golden.items():
        assert [c.config_hash() for c in load_study(studies / name).cells] == hashes, name
