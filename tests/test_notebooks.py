"""Every notebook executed by papermill, in a fresh kernel, on the embedded default (the main
job runs the series once; see conftest.series_run), with its recorded figures checked."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import helpers.embedded
from helpers import NOTEBOOKS, env, manifest, merge


def figures(series_run, stem):
    run_dir, data = series_run
    entry = data["notebooks"][stem]
    assert entry["status"] == "ok", entry.get("error")
    return entry["metrics"]


def test_every_notebook_ran_and_left_its_executed_copy(series_run):
    run_dir, data = series_run
    for stem in NOTEBOOKS:
        assert data["notebooks"][stem]["status"] == "ok"
        executed = json.loads((run_dir / f"{stem}.ipynb").read_text())
        errors = [o for c in executed["cells"] if c["cell_type"] == "code"
                  for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
    assert data["versions"]["torch"] and data["machine"]["cpu_cores"] >= 1
    assert data["parameters"]["MODEL"] == "embedded"


def test_01_environment(series_run):
    m = figures(series_run, "01_environment_and_cuda")
    assert m["bnb_selftest_ok"] == 1
    assert 0.05 < m["bnb_relative_error"] < 0.15  # 4-bit rounding of a random matrix: ~10%
    assert m["gpu_count"] == torch.cuda.device_count()
    assert m["requirements_ok"] == 1


def test_02_footprint_table_and_estimator(series_run):
    m = figures(series_run, "02_load_in_4bit")
    # the part-by-part table sums to the measured footprint
    assert m["footprint_breakdown_bytes"] == pytest.approx(m["footprint_bytes"], rel=0.005)
    # 4-bit is smaller than 16-bit by the ratio the estimator predicts (within 5%)
    measured = m["footprint_bytes"] / m["footprint_bytes_16bit"]
    predicted = m["predicted_footprint_bytes"] / m["predicted_footprint_bytes_16bit"]
    assert measured == pytest.approx(predicted, rel=0.05)
    if torch.cuda.is_available():  # on CPU the unquantized layers compute (and stay) in float32
        assert measured < 1
    assert m["peak_cpu_rss_bytes_load"] > 0
    # NF4 rounds a model's (normally distributed) weights more finely than FP4
    assert m["quant_error_nf4_MLP"] < m["quant_error_fp4_MLP"]
    assert m["quant_error_nf4_attention"] < m["quant_error_fp4_attention"]


def test_03_lora(series_run):
    m = figures(series_run, "03_lora_setup")
    assert m["lora_formula_matches"] == 1 and m["gradient_check_ok"] == 1
    # embedded GPT-NeoX, all-linear scope: the 4 linear layers of every block
    from helpers import models

    layers = models.load_config("embedded").num_hidden_layers
    assert m["lora_target_count"] == 4 * layers
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["trainable_percent"] == pytest.approx(100 * m["trainable_params"] / m["total_params"],
                                                   rel=1e-3)


def test_04_dataset(series_run):
    m = figures(series_run, "04_dataset_preparation")
    assert m["train_examples"] + m["eval_examples"] == 850  # the embedded quotations
    assert m["eval_examples"] == pytest.approx(85, abs=1)
    assert m["truncated_examples"] == 0 and m["packing_dropped_tokens"] == 0
    assert 20 < m["mean_tokens"] < 80
    assert m["train_tokens"] > m["train_examples"] * 10


def test_05_training_learned(series_run):
    m = figures(series_run, "05_paged_optimizer_training")
    assert m["eval_loss_after"] <= 0.8 * m["eval_loss_before"]
    # the tuned model stops: EOS was learned. Of the 16 greedy outputs the few that do not stop
    # loop on repeated words (a model of 0.9M parameters after 200 steps); how many varies with
    # the float rounding of the machine that trained it (at most 3 on one CPU, 4 on another)
    assert m["tuned_eos_rate"] >= 0.7
    assert m["tuned_form_rate"] >= 0.4 and m["tuned_form_rate"] > m["base_form_rate"]
    # held-out quotations as prompts: the untuned base does not write "quote (Author)" and stop
    assert m["base_form_rate"] <= 0.2
    for name in ("base", "tuned"):  # scored against what the held-out quotation really says
        assert 0 <= m[f"{name}_exact_match"] <= 1 and 0 <= m[f"{name}_token_f1"] <= 1
    assert m["tokens_per_second"] > 0 and m["micro_batch"] >= 1
    assert m["train_steps"] == 200
    run_dir, _ = series_run
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    # scaling out: the configs are written (not launched); Llama-2-70B fits 2 x 24 GB only sharded
    # and offloaded (NCCL's buffers push the sharded plan past 24 GB, as measured on two H200s)
    assert (run_dir / "accelerate_ddp_cpu.yaml").is_file() or torch.cuda.is_available()
    assert m["predicted_70b_fsdp_2gpu_offload_bytes"] < 24e9 < m["predicted_70b_fsdp_2gpu_bytes"]
    assert m["predicted_70b_fsdp_2gpu_bytes"] < m["predicted_70b_ddp_2gpu_bytes"]
    assert m["predicted_70b_fsdp_1gpu_bytes"] == m["predicted_70b_ddp_1gpu_bytes"]


def test_06_merge_agrees(series_run):
    m = figures(series_run, "06_inference_and_merge")
    # the tolerance of the merge's dtype: float32 on CPU (1e-4 of the logits' scale), the GPU's
    # 16-bit compute dtype there (W + BA rounded to bf16 / fp16)
    tolerance = merge.MERGE_TOLERANCE[env.compute_dtype()]
    assert m["merge_max_rel_logit_diff"] <= tolerance["rtol"]
    assert m["merge_top1_agreement"] >= tolerance["min_top1"]
    if env.compute_dtype() == torch.float32:  # 16-bit: a near-tie between two tokens can flip
        assert m["merged_generation_matches"] == 1
    assert m["merge_dequantized"] == 0  # the embedded base's 16-bit weights are on disk
    assert m["tuned_form_rate"] >= 0.4 and m["base_form_rate"] <= 0.2  # the adapter, reloaded
    run_dir, _ = series_run
    assert list((run_dir / "merged").glob("*.safetensors"))


def machine_paths(run_dir) -> set:
    """The absolute paths of this machine that files a run shares must not name."""
    paths = {run_dir.absolute(), run_dir.resolve(), Path.home(), Path.cwd(),
             Path(helpers.__file__).resolve().parent.parent,  # the repository
             helpers.embedded.embedded_path(build=False).parent}  # the embedded model's cache
    return {str(p) for p in paths if len(p.parts) > 1}


def test_no_secret_or_machine_path_in_what_a_run_shares(series_run):
    """The manifest, the dataset's stats, every text file of the adapter and the merged model,
    and the checkpoints' settings name no path of this machine (the run directory, the home directory with the embedded
    model's cache, the current directory, the repository): local files by their path relative to
    RUN_DIR where they are read back, the command line with RUN_DIR."""
    run_dir, data = series_run
    text = json.dumps(data)
    assert "HF_TOKEN" not in text and "hf_" not in text.lower().replace("hf_hub", "")
    assert data["parameters"]["RUN_DIR"] == "."
    assert all(entry["parameters"]["RUN_DIR"] == "." for entry in data["notebooks"].values())
    if "QLORA_TEST_RUN_DIR" not in os.environ:  # the command the fixture ran
        assert data["command"] == "python -m helpers.run --run-dir RUN_DIR"
    shared = [manifest.path(run_dir), run_dir / "dataset_stats.json"]
    for folder in ("adapter", "merged"):
        files = [p for p in (run_dir / folder).rglob("*") if p.is_file()]
        assert any(p.name.endswith("config.json") for p in files), folder
        shared += [p for p in files if p.suffix != ".safetensors"]
    assert run_dir / "adapter" / "adapter_config.json" in shared
    # the checkpoints' configs, model cards (peft's) and signatures, which resume reads
    shared += [p for p in (run_dir / "checkpoints").rglob("*") if p.suffix in (".json", ".md")]
    base = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == helpers.embedded.EMBEDDED_VERSION
    found = [f"{file.relative_to(run_dir)} names {p}" for file in shared
             for p in machine_paths(run_dir)
             if re.search(re.escape(p) + r"(?![\w-]|\.\w)", file.read_text(encoding="utf-8"))]
    assert not found
