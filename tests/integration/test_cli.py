"""The real CLI, as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import child_env

pytestmark = pytest.mark.integration
COMMANDS = ["tiny-model", "synth", "prepare", "score", "train", "eval", "plan", "demo"]


def run(*args, check=True, timeout=600):
    return subprocess.run([sys.executable, "-m", "stepdpo.cli", *map(str, args)], env=child_env(),
                          capture_output=True, text=True, check=check, timeout=timeout)


def test_help_lists_every_stage():
    out = run("--help").stdout
    for cmd in COMMANDS:
        assert cmd in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_explains_its_options(cmd):
    out = run(cmd, "--help").stdout
    assert "usage:" in out and len(out) > 200


def test_tiny_synth_prepare_eval(tmp_path):
    run("tiny-model", "--arch", "mistral", "--out", tmp_path / "m")
    run("synth", "--out", tmp_path / "d.jsonl", "--problems", 60, "--max-value", 9)
    out = run("prepare", "--input", tmp_path / "d.jsonl", "--out", tmp_path / "p", "--test-fraction", 0.2).stdout
    assert "pairs written" in out and "split by problem" in out
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["files"]["test"] == "test/pairs.jsonl" and report["counts"]["pairs_written"] > 50
    run("eval", "--model", tmp_path / "m", "--ref-model", tmp_path / "m", "--pairs", tmp_path / "p" / "test",
        "--out", tmp_path / "e", "--no-progress")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["pair_accuracy_ref"] == 0.5 and 0 <= metrics["pair_accuracy"] <= 1  # policy == reference


def test_prepare_strict_error_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": {"problem": "x"}, "label": {"steps": []}}\n{oops\n')
    res = run("prepare", "--input", tmp_path / "bad.jsonl", "--out", tmp_path / "o", "--strict", check=False)
    assert res.returncode == 2 and "bad.jsonl:2: invalid_json" in res.stderr


def test_train_from_yaml_with_cli_override(tmp_path, tiny_mistral, synth_pairs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model_name_or_path: {tiny_mistral}
train_pairs: {synth_pairs / 'train' / 'pairs.jsonl'}
output_dir: {tmp_path / 'run'}
max_steps: 2
per_device_train_batch_size: 4
learning_rate: 1.0e-3
use_cpu: true
report_to: none
gradient_checkpointing: false
save_strategy: "no"
logging_steps: 1
""")
    run("train", "--config", recipe, "--learning_rate", "5e-4", "--max_steps", "3")
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 3
    lrs = [h["learning_rate"] for h in summary["log_history"] if "learning_rate" in h]
    assert lrs[0] == pytest.approx(5e-4)
    assert (tmp_path / "run" / "final" / "COMPLETED").is_file()


def test_inspect_shows_step_dpos_exact_text_with_a_chat_model(tiny_mistral, tmp_path):
    """A Step-DPO-layout file through prepare, then `stepdpo inspect --json` with a recipe: the trainer's texts are
    Step-DPO's own concatenation, byte for byte, and training uses exactly those token ids."""
    import shutil

    from transformers import AutoTokenizer

    from tests.unit.data.test_render import QWEN2_TEMPLATE, STEP_DPO_QWEN2_BOXED
    from tests.unit.data.test_formats import STEP_DPO_ROWS

    chat = tmp_path / "chat"
    shutil.copytree(tiny_mistral, chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN2_TEMPLATE
    tok.save_pretrained(chat)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(chat)
    rows = STEP_DPO_ROWS
    (tmp_path / "sd.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run("prepare", "--format", "step-dpo", "--input", tmp_path / "sd.jsonl", "--out", tmp_path / "p")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: {chat}\ntrain_pairs: {tmp_path / 'p' / 'pairs.jsonl'}\n"
                      f"output_dir: {tmp_path / 'run'}\nmax_length: 512\nbeta: 0.5\nuse_cpu: true\nreport_to: none\n"
                      "max_steps: 1\nper_device_train_batch_size: 2\n")
    out = run("inspect", "--config", recipe, "--pairs", tmp_path / "p", "-n", len(rows), "--json").stdout
    shown = [json.loads(x) for x in out.splitlines()]
    expected = {(STEP_DPO_QWEN2_BOXED.format(instruction=r["prompt"]) + r["initial_reason_steps"] + r["chosen"],
                 STEP_DPO_QWEN2_BOXED.format(instruction=r["prompt"]) + r["initial_reason_steps"] + r["rejected"])
                for r in rows}  # two rows are the same pair ("Step 1:" + " a" and "" + "Step 1: a"): one pair
    assert {(s["text_chosen"], s["text_rejected"]) for s in shown} == expected and len(shown) == len(expected)
    for got in shown:
        assert got["tokens"]["prompt"] == len(got["ids"]["prompt"]) and got["dropped_prefix_steps"] == 0
    # the trainer's own dataset holds exactly inspect's ids
    from stepdpo.cli import parse
    from stepdpo.train.run import build_trainer

    trainer = build_trainer(parse("train", ["--config", str(recipe)])[0])
    ds = {tuple(r["prompt_ids"] + r["chosen_ids"]) for r in trainer.train_dataset}
    assert {tuple(s["ids"]["prompt"] + s["ids"]["chosen"]) for s in shown} == ds


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory, tiny_mistral, synth_pairs):
    d = tmp_path_factory.mktemp("broken")
    lines = (synth_pairs / "train" / "pairs.jsonl").read_text().splitlines()
    (d / "malformed.jsonl").write_text(lines[0] + "\n" + '{"id": "x", "kind": "step"}\n')
    (d / "empty.jsonl").write_text("")
    adapter = d / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(d / "gone"),
                                                             "peft_type": "LORA"}))
    (d / "a_file").write_text("not a directory")
    (d / "steps.jsonl").write_text(json.dumps({"prompt": "Q", "chosen": ["a"], "rejected": ["b"]}) + "\n")
    return d


def _one_line_cases(d, model, pairs):
    train = ["train", "--model_name_or_path", model, "--output_dir", d / "run", "--use_cpu", "true", "--report_to",
             "none", "--train_pairs"]
    return {
        "train: malformed pair line": (train + [d / "malformed.jsonl"], "malformed.jsonl:2"),
        "score: malformed pair line": (["score", "--pairs", d / "malformed.jsonl", "--model", model, "--out", d / "s"],
                                       "malformed.jsonl:2"),
        "eval: malformed pair line": (["eval", "--pairs", d / "malformed.jsonl", "--model", model, "--out", d / "e"],
                                      "malformed.jsonl:2"),
        "train: max_length below every pair": (train + [pairs, "--max_length", "4"], "raise --max_length"),
        "train: step loss on unscored pairs": (train + [pairs, "--step_loss", "seed"], "stepdpo score"),
        "train: empty pairs file": (train + [d / "empty.jsonl"], "holds no pairs"),
        "prepare: unwritable output": (["prepare", "--input", d / "steps.jsonl", "--format", "steps", "--out",
                                        d / "a_file" / "o"],
                                       "a_file"),
        "eval: missing model": (["eval", "--pairs", pairs, "--model", d / "nope", "--out", d / "e2"], "no such model"),
        "eval: adapter base missing": (["eval", "--pairs", pairs, "--model", d / "adapter", "--out", d / "e3"],
                                       "base model"),
        "score: local model missing, offline": (["score", "--pairs", pairs, "--model", d / "nope", "--out", d / "s2"],
                                                "--model " + str(d / "nope") + ": no such model directory"),
    }


@pytest.mark.parametrize("case", ["train: malformed pair line", "score: malformed pair line", "eval: malformed pair line",
                                  "train: max_length below every pair", "train: step loss on unscored pairs",
                                  "train: empty pairs file", "prepare: unwritable output", "eval: missing model",
                                  "eval: adapter base missing", "score: local model missing, offline"])
def test_one_line_errors_instead_of_tracebacks(case, broken_inputs, tiny_mistral, synth_pairs):
    args, words = _one_line_cases(broken_inputs, tiny_mistral, synth_pairs / "test" / "pairs.jsonl")[case]
    res = run(*args, check=False)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and words in res.stderr, res.stderr[-3000:]
    assert err[-1].startswith("stepdpo ") and ": error:" in err[-1]
    if case == "train: empty pairs file":  # --debug shows the traceback instead (one case suffices)
        debug = run(*args, "--debug", check=False)
        assert "Traceback" in debug.stderr


def test_train_sh_rejects_zero_processes():
    res = subprocess.run(["bash", "launch/train.sh", "--mode", "cpu-ddp", "--procs", "0", "--config",
                          "configs/recipes/tiny/mistral_cpu.yaml"], capture_output=True, text=True,
                         cwd=__import__("tests.conftest", fromlist=["REPO"]).REPO)
    assert res.returncode == 2 and "--procs must be a positive integer" in res.stderr
