"""`stepdpo plan` against DeepSpeed's own estimators, from the config alone (meta device)."""

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from stepdpo.plan import GIB, count_parameters, load_config, make_plan, zero_model_states

MISTRAL = "mistralai/Mistral-7B-v0.1"  # offline: the bundled copy of its config


@pytest.fixture(scope="module")
def counts():
    return count_parameters(load_config(MISTRAL), lora_r=16)


def test_mistral_7b_parameter_count(counts):
    assert counts["total"] == 7_241_732_096
    assert counts["largest_layer"] == 32000 * 4096  # the embedding / LM head
    assert counts["lora"] == 41_943_040  # r=16 on every linear layer of the 32 blocks


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (2, 8)])
@pytest.mark.parametrize("offload, cpu_offload, cpu_offload_params", [
    ("none", False, False), ("optimizer", True, False), ("all", True, True)])
def test_zero3_matches_deepspeed(counts, nodes, gpus, offload, cpu_offload, cpu_offload_params):
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        counts["total"], counts["largest_layer"], num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=cpu_offload,
        cpu_offload_params=cpu_offload_params, zero_init=True, additional_buffer_factor=1.5)
    ours_gpu, ours_cpu = zero_model_states(counts["total"], counts["largest_layer"], gpus, nodes, 3, offload)
    assert (ours_gpu, ours_cpu) == (ds_gpu, ds_cpu)
    plan = make_plan(MISTRAL, nodes=nodes, gpus_per_node=gpus, mode="full", zero=3, offload=offload)
    assert plan["per_gpu_gib"]["model_states (weights+grads+optimizer)"] == round(ds_gpu / GIB, 3)
    assert plan["per_node_cpu_gib"]["model_states"] == round(ds_cpu / GIB, 2)


@pytest.mark.parametrize("nodes, gpus", [(1, 8), (2, 8)])
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_matches_deepspeed(counts, nodes, gpus, offload):
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(
        counts["total"], num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload != "none",
        additional_buffer_factor=1.5)
    assert zero_model_states(counts["total"], 0, gpus, nodes, 2, offload) == (ds_gpu, ds_cpu)


def test_lora_modes_are_far_smaller_and_qlora_smallest():
    full = make_plan(MISTRAL, mode="full", zero=3)
    lora = make_plan(MISTRAL, mode="lora", zero=3)
    qlora = make_plan(MISTRAL, mode="qlora", zero=3)
    assert qlora["per_gpu_total_gib"] < lora["per_gpu_total_gib"] < full["per_gpu_total_gib"]
    assert lora["per_gpu_gib"]["reference_model"] == 0 and full["per_gpu_gib"]["reference_model (frozen bf16 copy)"] > 0
    assert qlora["per_gpu_load_peak_gib"] > 3.5  # the whole nf4 model, per rank, while loading
    act = qlora["activations_gib"]
    assert act["with_gradient_checkpointing"] < act["without_gradient_checkpointing"] / 5


def test_cli_json(capsys):
    import json

    from stepdpo.cli import main

    assert main(["plan", "--model", MISTRAL, "--nodes", "2", "--gpus-per-node", "8", "--mode", "qlora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == 7_241_732_096 and out["nodes"] == 2
