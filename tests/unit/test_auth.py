"""The preflight launch/train.sh runs before any worker: a recipe it cannot read is one line, exit 2."""

from __future__ import annotations

from stepdpo import auth


def test_a_recipe_that_is_not_yaml_is_one_line_before_any_worker(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\nlora_target_modules: [q_proj\nbeta: 0.1\n")
    assert auth.main(["--config", str(recipe)]) == 2  # was yaml's traceback
    assert capsys.readouterr().err == (f"stepdpo preflight: --config {recipe}: not valid YAML (line 3, column 5: "
                                       "expected ',' or ']', but got ':')\n")
