"""The preflight launch/train.sh runs before any worker: a recipe it cannot read is one line, exit 2."""

from __future__ import annotations

from stepdpo import auth


def test_a_recipe_that_is_not_yaml_is_one_line_before_any_worker(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\nlora_target_modules: [q_proj\nbeta: 0.1\n")
    assert auth.main(["--config", str(recipe)]) == 2  # was yaml's traceback
    assert capsys.readouterr().err == (f"stepdpo preflight: --config {recipe}: not valid YAML (line 3, column 5: "
                                       "expected ',' or ']', but got ':')\n")


def test_a_recipe_it_cannot_read_is_one_line_naming_it(tmp_path, capsys):
    # before: open's or yaml's traceback, or a TypeError for a file that is a YAML list, before any worker
    listed = tmp_path / "list.yaml"
    listed.write_text("- model_name_or_path: m\n")
    for path, problem in ((tmp_path / "none.yaml", "No such file or directory"), (tmp_path, "Is a directory"),
                          (listed, "not a YAML mapping of option names to values (`key: value` lines)")):
        assert auth.main(["--config", str(path)]) == 2
        assert capsys.readouterr().err == f"stepdpo preflight: --config {path}: {problem}\n"
