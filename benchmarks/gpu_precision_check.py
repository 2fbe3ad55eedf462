"""How far a bf16 run on the GPU is from an fp32 run on the CPU, and where the difference comes from.

Run on a CUDA machine from the repository root: ``PYTHONPATH=.:benchmarks python benchmarks/gpu_precision_check.py``
(``--cpu-only`` compares bf16 and fp32 on the CPU alone). For the test suite's tiny random Llama and for the
organism (l = 3): the relative difference, against fp32 on the CPU, of
- the forget-loss gradient w.r.t. the trained down-projections at the initial weights (one backward);
- the weight updates after 1, 5 and 20 Adaptive RMU steps (masked loss), and the largest relative difference
  of the logged forget losses,
for bf16 on the CPU, fp32 on the GPU and bf16 on the GPU. Adam divides each gradient element by its own
running scale, so elements whose gradient is near zero move by about the learning rate whatever the sign
noise says: the update difference can grow with the steps although each gradient agrees.
"""
from __future__ import annotations

import argparse
import copy
import warnings

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_attention_check import forget_grads
from rmu_analysis import models
from rmu_analysis.testing import organism_case, tiny_case, tiny_tokenizer
from rmu_analysis.unlearning import unlearn
from rmu_analysis.unlearning.common import draw_control_vectors, loss_masks, reference_padding, tokenize


def attention(device):
    """"cuda-math": the GPU with the math attention backend only (isolates the attention kernels)."""
    return sdpa_kernel(SDPBackend.MATH) if device.endswith("-math") else contextlib.nullcontext()


def grad(case, device, dtype):
    with attention(device):
        return _grad(case, device.removesuffix("-math"), dtype)


def _grad(case, device, dtype):
    model = copy.deepcopy(case.model).to(device, dtype)
    with reference_padding(case.tokenizer):
        inputs = tokenize(case.tokenizer, list(case.forget[next(iter(case.forget))][:4]), case.forget_max_length[0],
                          torch.device(device))
    mask, _ = loss_masks(inputs, "masked", case.tokenizer.bos_token_id)
    u = draw_control_vectors(1, model.config.hidden_size, 0, torch.float32, torch.device(device))[0]
    return forget_grads(model, inputs, u, case.coeff, case.layer, tuple(range(case.layer - 2, case.layer + 1)), mask)[1]


def run(case, device, dtype, steps):
    model = copy.deepcopy(case.model).to(device.removesuffix("-math"), dtype)
    saved = models.no_cudnn_attention
    if device.endswith("-math"):
        models.no_cudnn_attention = lambda: sdpa_kernel(SDPBackend.MATH)
    try:
        return _run(model, case, steps)
    finally:
        models.no_cudnn_attention = saved


def _run(model, case, steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = unlearn(model, case.tokenizer, case.forget, case.retain,
                      case.config("adaptive-rmu", steps=steps, loss="masked", log_every=1), progress=False)
    return res


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cpu-only", action="store_true")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    variants = [("cpu", torch.bfloat16)] + ([] if args.cpu_only else [("cuda", torch.float32), ("cuda", torch.bfloat16),
                                                                  ("cuda-math", torch.bfloat16)])
    tok = tiny_tokenizer()
    print(f"{'case':9s} {'variant':14s} {'grad':>7s} {'upd@1':>7s} {'upd@5':>7s} {'upd@20':>7s} {'loss':>7s}")
    for name, case in (("tiny", tiny_case(tok)), ("organism", organism_case())):
        case.model = case.model.float()
        g_ref = grad(case, "cpu", torch.float32)
        before = {k: v.detach().float().clone() for k, v in case.model.named_parameters()}
        refs = {s: run(case, "cpu", torch.float32, s) for s in (1, 5, 20)}
        for device, dtype in variants:
            row = [rel(grad(case, device, dtype), g_ref)]
            loss = float("nan")
            for s in (1, 5, 20):
                res = run(case, device, dtype, s)
                d = torch.cat([(res.trained[k].float().cpu() - before[k].to(dtype).float()).flatten() for k in sorted(res.trained)])
                d_ref = torch.cat([(refs[s].trained[k] - before[k]).flatten() for k in sorted(res.trained)])
                row.append(rel(d, d_ref))
                if s == 20:
                    loss = max(abs(a["forget_loss"] - b["forget_loss"]) / abs(b["forget_loss"])
                               for a, b in zip(res.log, refs[s].log))
            print(f"{name:9s} {device + ' ' + str(dtype).replace('torch.', ''):14s} " +
                  " ".join(f"{x:7.4f}" for x in row) + f" {loss:7.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
