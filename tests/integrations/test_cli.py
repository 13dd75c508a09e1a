"""The `fxlora` command line, through click's test runner."""

import json
import re

from click.testing import CliRunner

from fxlora.cli import main


def test_explain_prints_the_site_report():
    result = CliRunner().invoke(
        main, ["explain", "--family", "llama", "--hidden", "64", "--layers", "1", "--r", "8", "--targets", "all-linear", "--seq", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "7 LoRA sites on 8 linears" in result.output
    assert "self_attn.q_proj [default]" in result.output and re.search(r"f[123]/b\d+", result.output)
    assert "candidates for" not in result.output  # the short report: chosen forms only


def test_explain_verbose_adds_every_candidate():
    result = CliRunner().invoke(main, ["explain", "--hidden", "64", "--layers", "1", "--seq", "32", "--verbose"])
    assert result.exit_code == 0, result.output
    assert "candidates for sites" in result.output and "FLOPs formula" in result.output


def test_explain_from_hf_and_peft_json(tmp_path):
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}))
    peft = tmp_path / "adapter_config.json"
    peft.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    result = CliRunner().invoke(main, ["explain", "--hf-config", str(hf), "--peft-config", str(peft), "--seq", "8",
                                       "--options", '{"objective": "flops"}'])
    assert result.exit_code == 0, result.output
    assert "2 LoRA sites" in result.output and "v_proj [default]" in result.output


def test_explain_rejects_bad_options():
    result = CliRunner().invoke(main, ["explain", "--options", "[1]"])
    assert result.exit_code == 2 and "JSON object" in result.output


def test_bench_forwards_to_the_benchmark(tmp_path):
    help_result = CliRunner().invoke(main, ["bench", "--help"])
    assert help_result.exit_code == 0 and "--contestants" in help_result.output  # the benchmark's own parser
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, [
        "bench", "--quick", "--seqs", "16", "--dropouts", "0", "--contestants", "peft-eager,fxlora", "--inner", "aot_eager",
        "--steps", "1", "--warmup", "1", "--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2",
        "--vocab", "64", "--out-dir", str(out), "--tag", "t", "--no-plot", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "lora_t.json").exists() and (out / "lora_t.md").exists()
