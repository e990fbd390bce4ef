"""The generated CLI: every stage's parser comes from its options dataclass, takes --config YAML plus
overrides, and both flag spellings; errors are one line with exit status 2."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from stepdpo import cli
from stepdpo.errors import OptionsError

PACKAGE = Path(cli.__file__).parent


@pytest.mark.parametrize("name", list(cli.STAGES))
def test_every_stage_is_a_dataclass_a_function_and_a_generated_parser(name):
    parser, fn = cli.make_parser(name)
    options_cls = parser.dataclass_types[0]
    assert dataclasses.is_dataclass(options_cls) and callable(fn)
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in dataclasses.fields(options_cls):
        if "_" in f.name:  # both spellings, from the field name alone
            assert f"--{f.name}" in flags and f"--{f.name.replace('_', '-')}" in flags, f.name
        if name not in ("train", "sft"):  # every stepdpo-owned option documents itself
            assert f.metadata.get("help"), f"{name}: --{f.name} has no help text"


def test_yaml_config_then_flags_override(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("input: [a.jsonl, b.jsonl]\nout: somewhere\ntest_fraction: 0.2\nseed: 7\n")
    opts, _ = cli.parse("prepare", ["--config", str(cfg), "--seed", "9", "--no-progress"])
    assert opts.input == ["a.jsonl", "b.jsonl"] and opts.out == "somewhere"
    assert opts.test_fraction == 0.2 and opts.seed == 9 and opts.progress is False
    snake, _ = cli.parse("prepare", ["--input", "x", "--out", "o", "--test_fraction", "0.1"])
    kebab, _ = cli.parse("prepare", ["--input", "x", "--out", "o", "--test-fraction", "0.1"])
    assert snake == kebab


def test_an_unknown_option_is_named_with_the_nearest_real_one(tmp_path):
    # before: "Some specified arguments are not used by the HfArgumentParser: ['--train_file', 'x']", or, for
    # train, a missing --train_pairs reported first
    with pytest.raises(OptionsError) as e:
        cli.parse("train", ["--model_name_or_path", "m", "--train_file", "x", "--output_dir", "o"])
    assert str(e.value) == ("unknown option --train_file (did you mean --train_pairs?); `stepdpo train --help` lists "
                            "every option")
    with pytest.raises(OptionsError, match=r"^unknown option --inptu \(did you mean --input\?\)"):
        cli.parse("prepare", ["--inptu=x", "--out", "o"])
    # what argparse itself takes stays taken: an unambiguous prefix, a value with a space that starts with --
    opts, _ = cli.parse("generate", ["--problem", "p", "--model", "m", "--out", "o", "--instruction", "-- a rule"])
    assert opts.problems == "p" and opts.instruction == "-- a rule"


def test_a_name_from_another_trainer_points_at_ours():
    # before: --epochs suggested --step_loss, --lora_rank --local_rank, --batch_size --auto_find_batch_size, and --lr
    # got argparse's "could match --lr_scheduler_type, --lr-scheduler-type, ..." with no word of --learning_rate
    def message(stage, flag):
        with pytest.raises(OptionsError) as e:
            cli.check_options(stage, [flag, "1"])
        return str(e.value)

    tail = "; `stepdpo train --help` lists every option"
    assert message("train", "--epochs") == "unknown option --epochs (did you mean --num_train_epochs?)" + tail
    assert message("train", "--lora_rank") == "unknown option --lora_rank (did you mean --lora_r?)" + tail
    assert message("train", "--micro-train-batch-size") == (
        "unknown option --micro-train-batch-size (did you mean --per_device_train_batch_size?)" + tail)
    assert message("train", "--lr") == ("ambiguous option --lr: it is the start of --lr_scheduler_kwargs and "
                                        "--lr_scheduler_type (did you mean --learning_rate?); give the whole name")
    # a name is offered only where the stage has it: mine takes --out, and no learning rate
    assert message("mine", "--output_dir") == ("unknown option --output_dir (did you mean --out?); `stepdpo mine "
                                               "--help` lists every option")
    assert message("mine", "--lr") == "unknown option --lr; `stepdpo mine --help` lists every option"
    # spelling: every name as near as the nearest, up to three
    assert message("train", "--lora_alpah") == "unknown option --lora_alpah (did you mean --lora_alpha?)" + tail
    assert cli._did_you_mean("sample", ["samples", "sampler", "seed"]) == " (did you mean samples or sampler?)"


def test_an_unknown_config_key_is_named_with_its_file(tmp_path):
    cfg = tmp_path / "prepare.yaml"
    cfg.write_text("inptu: a.jsonl\nout: o\nsed: 3\nenv:\n  STEPDPO_UNUSED: '1'\n")
    with pytest.raises(OptionsError) as e:
        cli.parse("prepare", ["--config", str(cfg)])
    # before: "...Please remove them, add them to the dataclass, or set `fail_with_unknown_args=False`."
    assert str(e.value) == (f"--config {cfg}: unknown key 'inptu' (did you mean input?) (and 1 more: sed); "
                            "`stepdpo prepare --help` lists every option (keys are option names)")
    # plan and inspect read a training recipe: its other keys are not theirs to refuse
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: mistralai/Mistral-7B-v0.1\nbeta: 0.1\nlearning_rate: 1.0e-6\n")
    opts, _ = cli.parse("plan", ["--config", str(recipe)])
    assert opts.model_name_or_path == "mistralai/Mistral-7B-v0.1"
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [a\nout: b\n")
    for stage in ("prepare", "plan"):  # was yaml's traceback
        with pytest.raises(OptionsError) as e:
            cli.parse(stage, ["--config", str(broken)])
        assert str(e.value) == f"--config {broken}: not valid YAML (line 2, column 4: expected ',' or ']', but got ':')"


def test_check_reports_what_argparse_would_without_running_the_stage(tmp_path):
    # slurm/loop.sh and pipeline.sh run this before submitting: before, a misspelt --train-args flag or a recipe
    # value that is not one of its choices stopped the chain when the train job started, hours in
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("locate: rolout\nsamples: 4\n")
    job = ["--problems", "p.jsonl", "--model", "m", "--out", "o"]
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", ["--config", str(cfg), *job])
    assert str(e.value) == f"--config {cfg}: key locate: invalid choice: 'rolout' (choose from 'rollout', 'prm', 'equations')"
    cli.check_options("mine", ["--config", str(cfg), *job, "--locate", "prm"])  # a flag overrides the file's value
    cli.check_options("mine", ["--config", str(cfg), *job, "--loc", "prm"])  # also as argparse's prefix
    cfg.write_text("instruction: -terse\nstop: ['-stop', '\\n\\n']\n")  # values, not options
    cli.check_options("generate", ["--config", str(cfg), *job])
    cfg.write_text("samples: four\n")
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", ["--config", str(cfg), *job])
    assert str(e.value) == f"--config {cfg}: key samples: invalid int value: 'four'"
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", [*job, "--rollouts", "4.5"])
    assert str(e.value) == "argument --rollouts: invalid int value: '4.5'"
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", ["--model", "m"])
    assert str(e.value) == "the following arguments are required: --problems, --out"
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", [*job, "--rolouts", "4"])
    assert str(e.value) == "unknown option --rolouts (did you mean --rollouts?); `stepdpo mine --help` lists every option"
    with pytest.raises(OptionsError) as e:
        cli.check_options("mine", ["--config", str(tmp_path / "none.yaml"), *job])
    assert str(e.value) == f"--config {tmp_path / 'none.yaml'}: No such file or directory"
    # what needs the job's own inputs is left to the stage: the policy need not exist yet, and --locate prm's
    # need of --reward-model is the stage's own rule
    cli.check_options("mine", [*job, "--locate", "prm"])
    with pytest.raises(OptionsError):
        cli.parse("mine", [*job, "--locate", "prm"])


def test_check_command_reports_every_group_and_exits_2_if_one_failed(tmp_path, capsys):
    job = ["--problems", "p.jsonl", "--model", "m", "--out", "o"]
    assert cli.main(["check", "mine", *job, "--and", "prepare", "--input", "x", "--out", "o"]) == 0
    assert capsys.readouterr().out == "stepdpo check: mine: options OK\nstepdpo check: prepare: options OK\n"
    assert cli.main(["check", "mine", *job, "--samples", "x", "--and", "prepare", "--inptu", "x", "--and",
                     "preapre"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "stepdpo check: mine: argument --samples: invalid int value: 'x'",
        "stepdpo check: prepare: unknown option --inptu (did you mean --input?); `stepdpo prepare --help` lists "
        "every option",
        "stepdpo check: 'preapre' is not a stage; `stepdpo --help` lists them"]
    assert cli.main(["chek"]) == 2 and "did you mean 'check'" in capsys.readouterr().err


def test_help_keeps_an_options_own_default_text():
    text = " ".join(cli.make_parser("eval")[0].format_help().split())
    # before: "... (default: the run's, else 0.1). (default: None)"
    assert "Beta of the implicit reward margin (default: the run's, else 0.1). --" in text
    assert "(default: None)" not in text.split("--beta BETA")[1].split("--")[0]
    generate = " ".join(cli.make_parser("generate")[0].format_help().split())
    assert "Model name the vLLM server knows (default: --model). --" in generate
    assert "Sampling seed. (default: 0)" in generate  # argparse's own, where the help says nothing of it


def test_a_repeated_list_flag_keeps_every_value():
    opts, _ = cli.parse("score", ["--pairs", "p", "--model", "m", "--out", "o", "--backend", "vllm",
                                  "--url", "http://a:1", "--url", "http://b:2"])
    assert opts.url == ["http://a:1", "http://b:2"]


def test_validation_is_an_options_error_naming_the_flag():
    with pytest.raises(OptionsError, match="--test-fraction: must be in"):
        cli.parse("prepare", ["--input", "x", "--out", "o", "--test-fraction", "1.5"])


@pytest.mark.parametrize("stage", ["score", "generate", "mine"])
def test_a_negative_reconnect_timeout_is_refused_naming_the_flag(stage):
    args = ["--model", "m", "--out", "o", "--reconnect-timeout", "-1"]
    args += ["--pairs", "p"] if stage == "score" else ["--problems", "p"]
    with pytest.raises(OptionsError, match="--reconnect-timeout: must be >= 0 seconds"):
        cli.parse(stage, args)


def test_unknown_yaml_key_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("out: x.jsonl\nproblemz: 3\n")
    assert cli.main(["synth", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "problemz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_config_file_it_cannot_use_names_the_flag(tmp_path, capsys):
    # before: "stepdpo prepare: error: x.yaml: No such file or directory (check the path, its permissions and free
    # space; ...)" without the flag, and TRL's "Config file x.yaml must contain a YAML mapping."
    listed = tmp_path / "list.yaml"
    listed.write_text("- input: a.jsonl\n")
    for path, problem in ((tmp_path / "none.yaml", "No such file or directory"), (tmp_path, "Is a directory"),
                          (listed, "not a YAML mapping of option names to values (`key: value` lines)")):
        assert cli.main(["prepare", "--config", str(path)]) == 2
        assert capsys.readouterr().err == f"stepdpo prepare: error: --config {path}: {problem}\n"
    assert cli.main(["prepare", "--config"]) == 2
    assert capsys.readouterr().err == "stepdpo prepare: error: --config: give the YAML file's path\n"


def test_unknown_command_suggests(capsys):
    assert cli.main(["scroe"]) == 2
    assert "did you mean 'score'" in capsys.readouterr().err


def test_plan_reads_a_training_recipe():
    recipe = PACKAGE.parent / "configs" / "recipes" / "mistral-7b" / "qlora_zero3.yaml"
    opts, _ = cli.parse("plan", ["--config", str(recipe), "--nodes", "2"])
    assert (opts.model_name_or_path, opts.lora_r, opts.max_length, opts.per_device_train_batch_size,
            opts.mode) == ("mistralai/Mistral-7B-v0.1", 64, 1024, 2, "qlora")


@pytest.mark.parametrize("flag", ["--seq-len=-5", "--nodes=0", "--lora-r=0", "--micro-batch=-1"])
def test_plan_rejects_nonsense_sizes(flag):
    with pytest.raises(OptionsError, match="must be a positive whole number"):
        cli.parse("plan", ["--model", "mistralai/Mistral-7B-v0.1", flag])


# ------------------------------------------------------------------------------------------ structure
def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stepdpo"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stepdpo")}
    return found


def _module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        graph[name] = _imports(path)
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_only_the_cli_and_the_entry_points_import_the_cli():
    graph = _module_graph()
    importers = {m for m, deps in graph.items() if "stepdpo.cli" in deps}
    assert importers <= {"stepdpo.train.run", "stepdpo.train.sft"}, importers  # `python -m ...` delegates to it


def test_the_training_config_lives_in_train_and_scoring_never_imports_eval():
    graph = _module_graph()
    assert "stepdpo.config" not in graph and "stepdpo.train.config" in graph
    assert not any(d.startswith("stepdpo.evaluate") for d in graph["stepdpo.reward.score"])
    outside_train = {m for m, deps in graph.items() if not m.startswith("stepdpo.train") and "stepdpo.train.trainer" in deps}
    assert not outside_train, outside_train


def test_a_full_disk_names_the_stages_output(capsys):
    """An OSError from writing to an open file carries no file name: the message names the stage's output
    instead (before: "error:: No space left on device", with no path). /dev/full fails every write with ENOSPC."""
    assert cli.main(["synth", "--out", "/dev/full", "--kind", "problems", "--problems", "3"]) == 2
    assert capsys.readouterr().err.strip() == (
        "stepdpo synth: error: No space left on device (output --out /dev/full: check its permissions and free "
        "space; --debug shows the traceback)")
