"""The ``unlearn`` and ``evaluate`` subcommands on a tiny saved model."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from rmu_analysis.data import write_mcq
from rmu_analysis.testing import save_tiny_model_and_corpora
from rmu_analysis.unlearning import AdaptiveRMUConfig, RMUConfig, config_from_dict
from rmu_analysis.cli import main
from rmu_analysis.unlearning.cli import add_evaluate_parser, add_unlearn_parser, build_config



def parse(*argv):
    parser = argparse.ArgumentParser(prog="rmu-analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    add_unlearn_parser(sub)
    add_evaluate_parser(sub)
    return parser.parse_args(list(argv))


def test_flags_build_the_same_dataclasses():
    args = parse("unlearn", "--preset", "zephyr-7b-adaptive-rmu", "--steps", "150", "--alpha", "1000", "1200", "--out", "x")
    cfg = build_config(args)
    assert isinstance(cfg, AdaptiveRMUConfig) and cfg.steps == 150 and cfg.alpha == (1000.0, 1200.0) and cfg.beta == 5.0
    cfg = build_config(parse("unlearn", "--method", "rmu", "--layer", "3", "--coeff", "20", "--loss", "masked", "--out", "x"))
    assert cfg == RMUConfig(layer=3, steering_coeff=20.0, loss="masked")
    assert build_config(parse("unlearn", "--preset", "zephyr-7b-rmu", "--layer", "4", "--out", "x")).resolved_trained_layers() == (2, 3, 4)
    with pytest.raises(ValueError, match="--coeff does not apply to adaptive-rmu"):
        build_config(parse("unlearn", "--method", "adaptive-rmu", "--coeff", "6.5", "--out", "x"))
    with pytest.raises(ValueError, match="is a rmu recipe"):
        build_config(parse("unlearn", "--preset", "zephyr-7b-rmu", "--method", "npo", "--out", "x"))


def test_unlearn_then_evaluate_from_files(tiny_tokenizer, tmp_path, capsys):
    model_dir, bio, cyber, retain = save_tiny_model_and_corpora(tmp_path, tiny_tokenizer, 12)
    out = tmp_path / "unlearned"
    assert main(["unlearn", "--model", str(model_dir), "--method", "rmu", "--layer", "2", "--steps", "4", "--coeff", "20",
                 "--forget-files", str(bio), str(cyber), "--retain-file", str(retain), "--forget-max-length", "16",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rmu: 4 steps on topics bio, cyber" in printed and "saved to" in printed
    saved = json.loads((out / "rmu_config.json").read_text())
    assert config_from_dict(saved).steering_coeff == 20.0 and saved["base_model"] == str(model_dir)
    assert saved["trained_tensors"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]

    questions = [{"question": f"Which host does pathogen {i} infect?", "choices": ["bats", "mice", "birds", "pigs"],
                  "answer": i % 4} for i in range(6)]
    data = write_mcq(questions, tmp_path / "bio.jsonl")
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(out), "--data", f"bio={data}", "--generate", "2", "--json", str(report)]) == 0
    assert "MaxLogit" in capsys.readouterr().out
    numbers = json.loads(report.read_text())["topics"]["bio"]
    assert numbers["n"] == 6 and 0.0 <= numbers["accuracy"] <= 1.0 and numbers["max_logit_mean"] == numbers["max_logit_mean"]


def test_unlearn_needs_data_for_a_model_path(tmp_path, capsys):
    assert main(["unlearn", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "give --forget-files and --retain-file" in capsys.readouterr().err
