"""The GPU path of the unlearning engine: CUDA in fp32 and bf16, a model placed over two devices by accelerate,
``load_model(device_map="auto")`` and the CLI on CUDA. Needs a CUDA device: CI has none, so every test here is
skipped there with that reason (they run on a lent GPU machine via ``benchmarks/gpu_check.sh``, which also
times a Zephyr-7B-shaped model). The CPU-side placement rules (offloaded blocks) are tested in test_unlearning.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from rmu_analysis.models import decoder_blocks, load_model
from rmu_analysis.unlearning import save_unlearned, unlearn, unlearn_reference
from rmu_analysis.testing import max_diff, organism_case, snapshot, tiny_case, tiny_llama
from rmu_analysis.unlearning.common import select_trained
from rmu_analysis.unlearning.engine import master_copies

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32: no TF32 matrix units (they round to 10 mantissa bits)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _on_cuda(case, dtype=torch.float32):
    case = copy.copy(case)
    case.model = copy.deepcopy(case.model).to("cuda", dtype)
    return case


def _deltas(trained: dict, before: dict) -> torch.Tensor:
    return torch.cat([(trained[k].float().cpu() - before[k].float().cpu()).flatten() for k in sorted(trained)])


@pytest.mark.parametrize("loss", ["reference", "masked"])
@pytest.mark.parametrize("which", ["tiny", "organism"])
@pytest.mark.parametrize("method", ["rmu", "adaptive-rmu"])
def test_engine_matches_reference_on_cuda_fp32(tiny_tokenizer, which, method, loss):
    case = _on_cuda(tiny_case(tiny_tokenizer) if which == "tiny" else organism_case())
    cfg = case.config(method, loss=loss)
    fast = unlearn(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    plain = unlearn_reference(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    assert all(t.device.type == "cuda" for t in fast.trained.values())
    assert max_diff(fast.trained, plain.trained) <= 1e-5


@pytest.mark.parametrize("loss", ["masked", "reference"])
def test_bf16_on_cuda_follows_the_fp32_cpu_run(tiny_tokenizer, loss):
    """bf16 weights + fp32 master copies on CUDA take the same path as an fp32 run on the CPU, up to bf16
    rounding: the weight updates agree to a few percent and the losses to 1% (bf16 on the CPU: 1.0%).
    The "reference" convention also puts the padding positions (left padding: rows with nothing to attend
    to) into the loss, so it also checks that the GPU attention treats those rows as the CPU does."""
    cpu = tiny_case(tiny_tokenizer)
    cfg = cpu.config("adaptive-rmu", steps=20, loss=loss)
    before = snapshot(cpu.model)
    ref = unlearn(cpu.model, cpu.tokenizer, cpu.forget, cpu.retain, cfg, progress=False)
    gpu = _on_cuda(cpu, torch.bfloat16)
    trained = select_trained(gpu.model, (1, 2, 3), None)
    masters = master_copies(gpu.model, trained)
    assert all(m.dtype == torch.float32 and m.device.type == "cuda" for m in masters)
    res = unlearn(gpu.model, gpu.tokenizer, gpu.forget, gpu.retain, cfg, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in res.trained.values())
    d_ref = _deltas(ref.trained, before)
    d_gpu = _deltas(res.trained, {k: v.to(torch.bfloat16) for k, v in before.items()})
    rel = float((d_gpu - d_ref).norm() / d_ref.norm())
    print(f"bf16-CUDA vs fp32-CPU ({loss} loss): relative difference of the weight updates {rel:.4f}")
    assert rel <= 0.05
    for a, b in zip(res.log, ref.log):
        assert a["forget_loss"] == pytest.approx(b["forget_loss"], rel=0.01)


def test_model_placed_over_two_devices_gives_the_same_run(tiny_tokenizer):
    """accelerate's dispatch (what device_map="auto" does over several GPUs): embedding and blocks 0-1 on the
    GPU, blocks 2-4 and the head on the CPU, so the trained blocks 1-3 straddle two devices."""
    from accelerate import dispatch_model

    case = tiny_case(tiny_tokenizer)
    cfg = case.config("rmu", loss="masked")
    ref = unlearn(case.model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                  "model.layers.2": "cpu", "model.layers.3": "cpu", "model.layers.4": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu"}
    model = dispatch_model(copy.deepcopy(case.model), device_map=device_map, main_device="cpu")
    blocks = decoder_blocks(model)
    assert blocks[1].mlp.down_proj.weight.device.type == "cuda" and blocks[2].mlp.down_proj.weight.device.type == "cpu"
    res = unlearn(model, case.tokenizer, case.forget, case.retain, cfg, progress=False)
    assert {t.device.type for t in res.trained.values()} == {"cuda", "cpu"}
    assert max_diff({k: v.cpu() for k, v in res.trained.items()}, ref.trained) <= 1e-4
    res.apply_to(model)  # the placed model runs a full forward with the new tensors
    ids = case.tokenizer(["the city of Varon"], return_tensors="pt")["input_ids"].to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_load_model_device_map_auto_unlearn_and_save(tiny_tokenizer, tmp_path):
    src = tmp_path / "model"
    tiny_llama(len(tiny_tokenizer), n_layers=5).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    model, tok = load_model(src, dtype="bfloat16", device_map="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    case = tiny_case(tiny_tokenizer)
    res = unlearn(model, tok, case.forget, case.retain, case.config("adaptive-rmu", steps=10), progress=False)
    out = save_unlearned(res, tmp_path / "out", model, tok)
    again, _ = load_model(out, dtype="bfloat16", device_map="auto")
    state = again.state_dict()
    for name, tensor in res.trained.items():
        assert torch.equal(state[name], tensor)


def test_cli_unlearn_and_evaluate_on_cuda(tmp_path, capsys):
    """The organism recipe end to end on CUDA (bf16 by default there), then its evaluation."""
    pytest.importorskip("rmu_analysis.organism")
    from rmu_analysis.cli import main

    out = tmp_path / "armu"
    assert main(["unlearn", "--model", "organism", "--preset", "organism-adaptive-rmu", "--steps", "40",
                 "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert main(["evaluate", "--model", str(out), "--limit", "64", "--generate", "5",
                 "--json", str(tmp_path / "eval.json")]) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["topics"]
    assert set(rows) == {"bio", "cyber", "general"} and all(r["n"] == 64 for r in rows.values())
