"""The recipe table (configs/recipes.yaml), its reader and `make recipe`."""

import os
import shutil
import subprocess
import sys

import pytest

from emocompress.recipes import markdown_table, read_recipes, recipe_args

from .conftest import REPO

TABLE = str(REPO / "configs" / "recipes.yaml")


def test_recipe_args_are_the_command_and_the_stack_in_order():
    assert recipe_args("distill_control", TABLE) == [
        "fit", "-c", "configs/trainer/default.yaml", "-c", "configs/overlays/energy.yaml",
        "-c", "configs/recipes/distill.yaml", "-c", "configs/recipes/distill_control.yaml"]
    assert recipe_args("int8", TABLE)[:2] == ["test", "-c"] and recipe_args("int8", TABLE)[-2:] == [
        "--trainer.logger.init_args.name", "int8"]


@pytest.mark.parametrize(("entry", "message"), [
    ("x: {description: d, report: README.md}", "give description, report and configs"),
    ("x: {description: d, report: README.md, configs: [], stack: []}", "not ['stack']"),
    ("x: {description: d, report: README.md, configs: [], command: serve}", "command 'serve'"),
    ("x: {description: d, report: README.md, configs: [configs/no.yaml]}", "configs/no.yaml does not exist"),
])
def test_a_bad_recipe_is_refused_naming_it(tmp_path, entry, message):
    (tmp_path / "configs").mkdir()
    (tmp_path / "README.md").write_text("")
    (tmp_path / "configs" / "recipes.yaml").write_text(entry)
    with pytest.raises(ValueError, match="recipe 'x'") as error:
        read_recipes(str(tmp_path / "configs" / "recipes.yaml"))
    assert message in str(error.value)


def test_an_unknown_recipe_names_the_known_ones():
    with pytest.raises(ValueError, match="no recipe 'nope'; give one of teacher, baseline"):
        recipe_args("nope", TABLE)


def test_readme_recipe_table_is_the_table():
    # the README's table is `python -m emocompress.recipes --markdown`: regenerate it when the table changes
    assert markdown_table(TABLE) in (REPO / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("variables", "runs"), [
    ([], [[]]),
    (["SEEDS=1 2", "EXTRA=--trainer.max_epochs 1"],
     [["--seed_everything", s, "--trainer.logger.init_args.version", f"seed_{s}", "--trainer.max_epochs", "1"]
      for s in ("1", "2")]),
])
def test_make_recipe_runs_the_stack_of_the_table(tmp_path, variables, runs):
    # a stand-in emocompress that records its arguments, in a venv the Makefile finds installed
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    log = tmp_path / "args.txt"
    (bin_dir / "emocompress").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "emocompress").chmod(0o755)
    (tmp_path / "venv" / ".installed").touch()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(["make", "-s", "recipe", "NAME=distill", f"VENV={tmp_path / 'venv'}", *variables],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stack = recipe_args("distill", TABLE)
    assert [line.split() for line in log.read_text().splitlines()] == [stack + run for run in runs]


def test_make_recipe_of_an_unknown_name_fails_before_running_anything(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("needs make")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / "venv" / ".installed").touch()
    result = subprocess.run(["make", "-s", "recipe", "NAME=nope", f"VENV={tmp_path / 'venv'}"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True)
    assert result.returncode == 2 and "no recipe 'nope'" in result.stderr
