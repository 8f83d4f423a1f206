"""Study composition: command-line overrides, arm and seed subsets, ``extends:``, ``x-*``
anchor keys and ``plugins:`` (kdablate.compose, kdablate.study.load_study)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdablate.components import STRUCTURES
from kdablate.study import StudyError, load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.yaml"


def hashes(study) -> dict[tuple[str, int], str]:
    return {(c.arm, c.seed): c.config_hash() for c in study.cells}


def test_override_changes_only_the_cells_it_changes():
    plain = load_study(SMOKE)
    over = load_study(SMOKE, ["optim.epochs=2"])
    assert {c.optim.epochs for c in over.cells} == {2} and over.overrides == ("optim.epochs=2",)
    assert set(hashes(plain)) == set(hashes(over)) and all(hashes(plain)[k] != h for k, h in hashes(over).items())
    # Setting a value to what the file already says changes no hash.
    same = load_study(SMOKE, [f"optim.epochs={plain.cells[0].optim.epochs}"])
    assert hashes(same) == hashes(plain)


def test_override_of_one_arm_and_of_the_seeds():
    plain = load_study(SMOKE)
    arm = "ls"
    over = load_study(SMOKE, [f"arms.{arm}.temperature=8", "seeds=[0]"])
    assert {c.seed for c in over.cells} == {0}
    changed = {c.arm for c in over.cells if c.knowledge.temperature == 8.0}
    assert changed == {arm}
    assert {k: h for k, h in hashes(over).items() if k[0] != arm} == \
        {k: h for k, h in hashes(plain).items() if k[0] != arm and k[1] == 0}


@pytest.mark.parametrize("override, field, words", [
    ("optim.epochs=two", "base.optim.epochs", "integer"),
    ("optim.epocs=2", "optim.epocs", "unknown field"),
    ("arms.nope.alpha=0.5", "override 'arms.nope.alpha=0.5'", "no arm named 'nope'"),
    ("epochs", "override 'epochs'", "KEY=VALUE"),
    ("optim.lr=[1", "override value", "fix the syntax"),
])
def test_bad_override_is_one_line_naming_the_field(override, field, words):
    with pytest.raises(StudyError) as e:
        load_study(SMOKE, [override])
    assert field in e.value.field and words in e.value.message and "\n" not in str(e.value)


def test_arm_and_seed_subsets():
    plain = load_study(SMOKE)
    arm = plain.arms()[0]
    one = load_study(SMOKE, arms=[arm], seeds=[plain.config.seeds[0]])
    assert [(c.arm, c.seed) for c in one.cells] == [(arm, plain.config.seeds[0])]
    assert hashes(one).items() <= hashes(plain).items()
    globbed = load_study(SMOKE, arms=["*"])
    assert hashes(globbed) == hashes(plain)
    with pytest.raises(StudyError, match="matches no arm"):
        load_study(SMOKE, arms=["zzz*"])
    with pytest.raises(StudyError, match="is not one of the study's seeds"):
        load_study(SMOKE, seeds=[987])


def test_extends_merges_base_replaces_and_adds_arms(tmp_path):
    (tmp_path / "parent.yaml").write_text(SMOKE.read_text())
    parent = load_study(tmp_path / "parent.yaml")
    first = parent.config.arms[0].name
    (tmp_path / "child.yaml").write_text(f"""
extends: parent
x-fast: &fast {{epochs: 1}}
base: {{optim: *fast}}
seeds: [5]
arms:
  - {{name: {first}, mass: none, alpha: 0.0}}
  - {{name: extra_ls, mass: {{name: constant, eps: 0.1}}, structure: uniform, alpha: 1.0}}
""")
    child = load_study(tmp_path / "child.yaml")
    assert child.name == "child" and child.config.seeds == [5]
    assert child.arms() == [*parent.arms(), "extra_ls"]
    assert {c.optim.epochs for c in child.cells} == {1}
    assert {c.optim.batch_size for c in child.cells} == {c.optim.batch_size for c in parent.cells}  # merged
    assert next(c for c in child.cells if c.arm == first).knowledge.alpha == 0.0


def test_extends_cycle_and_missing_parent(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(StudyError, match="cycle"):
        load_study(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "c.yaml")


PLUGIN = '''
from kdablate.components import STRUCTURES
from kdablate.components.context import Component
from kdablate.components.structure import uniform_structure


@STRUCTURES.register("{name}")
class Mine(Component):
    """A user's structure: uniform, registered from a study's plugins list."""
    static = True

    def __call__(self, ctx, temperature):
        return uniform_structure(ctx.labels, ctx.num_classes)
'''


def test_plugins_register_a_users_structure(tmp_path):
    name = "test_compose_mine"
    (tmp_path / "mylab_plugin.py").write_text(PLUGIN.format(name=name))
    (tmp_path / "s.yaml").write_text(f"""
extends: {SMOKE}
plugins: [mylab_plugin]
arms: [{{name: mine, mass: {{name: constant, eps: 0.1}}, structure: {name}, alpha: 1.0}}]
""")
    study = load_study(tmp_path / "s.yaml")
    assert name in STRUCTURES and "mine" in study.arms() and study.plugins == ("mylab_plugin",)


def test_a_plugin_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "s.yaml").write_text(f"extends: {SMOKE}\nplugins: [no_such_module_xyz]\n")
    with pytest.raises(StudyError) as e:
        load_study(tmp_path / "s.yaml")
    assert e.value.field == "plugins[0]" and "no_such_module_xyz" in e.value.message


# --- the command line: overrides before or after options, subsets, --version, help ------------------

def test_cli_overrides_and_subsets(capsys):
    from kdablate.cli import main

    assert main(["dry-run", str(SMOKE), "--arm", "ce", "optim.epochs=2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "= 1 cells" in out and "\nce " in out
    assert next(c.config_hash() for c in load_study(SMOKE, ["optim.epochs=2"]).cells
                if c.arm == "ce" and c.seed == 1) in out


@pytest.mark.parametrize("argv, words", [
    (["dry-run", str(SMOKE), "optim.epocs=2"], "base.optim.epocs: unknown field"),
    (["dry-run", str(SMOKE), "--arm", "nope"], "'nope' matches no arm"),
    (["dry-run", str(SMOKE), "--bogus"], "unrecognized arguments: --bogus"),
    (["report", str(SMOKE), "x=1"], "unrecognized arguments: x=1"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, words, capsys):
    from kdablate.cli import main

    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1


def test_cli_version_and_help_name_the_environment(capsys):
    from kdablate.cli import main, parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("kdablate ")
    text = parser().format_help()
    assert all(v in text for v in ("MLFLOW_TRACKING_URI", "KDABLATE_CACHE", "KDABLATE_MAX_CELLS", "examples:"))
    sub = parser()._subparsers._group_actions[0].choices
    for name, p in sub.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_a_plugin_component_runs_in_spawned_workers_and_overrides_are_recorded(tmp_path):
    """The CLI with 2 worker processes: each spawned worker imports the study's plugins, and the
    parent run records the overrides and the resolved study."""
    import os
    import subprocess
    import sys

    from kdablate import tracking

    name = "test_compose_worker_mine"
    (tmp_path / "wlab_plugin.py").write_text(PLUGIN.format(name=name))
    (tmp_path / "w.yaml").write_text(f"""
plugins: [wlab_plugin]
base:
  data: {{name: mnist1d, num_samples: 500}}
  student: {{name: mlp, hidden: 16, depth: 1}}
  optim: {{epochs: 3, batch_size: 64}}
seeds: [0, 1]
arms: [{{name: mine, mass: {{name: constant, eps: 0.1}}, structure: {name}, alpha: 1.0}}]
""")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run([sys.executable, "-m", "kdablate.cli", "run", "w.yaml", "optim.epochs=1", "--workers", "2",
                          "--no-progress", "--cache-dir", str(tmp_path / "cache")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("w").experiment_id
    cells = tracking.search_cells(client, exp, "FINISHED")
    assert len(cells) == 2 and {r.data.params["optim.epochs"] for r in cells} == {"1"}
    parent = client.search_runs([exp], "tags.kind = 'study'")[0]
    assert parent.data.tags["kdablate.overrides"] == "optim.epochs=1" and parent.data.tags["kdablate.plugins"] == "wlab_plugin"
