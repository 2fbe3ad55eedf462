"""Which scaled-dot-product-attention backend gives the right RMU gradients on a GPU (bf16)?

Run on a CUDA machine: ``python benchmarks/gpu_attention_check.py``. The organism, a left-padded batch of bio
forget texts (padded length 64 and 96 tokens), the RMU forget loss in the "reference" convention (every
position, padding included) at block 3 and its gradient w.r.t. the trained MLP down-projections of blocks 1-3.
Each backend's bf16 result on the GPU is compared with fp32 on the CPU: relative error of block 3's output
on real tokens and on padding rows (rows with nothing to attend to), and of the gradient; NaN counts.
This is why the engine turns cuDNN attention off while training (``models.no_cudnn_attention``).
"""
from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from rmu_analysis.organism import load_organism, organism_corpora
from rmu_analysis.models import decoder_blocks
from rmu_analysis.unlearning.common import mse, reference_padding, tokenize
from rmu_analysis.unlearning.engine import run_prefix, run_trained

LAYER, TRAINED = 3, (1, 2, 3)


def forget_grads(model, inputs, u, coeff, layer=LAYER, trained=TRAINED, mask=None):
    """Block ``layer``'s output and the gradient of the RMU forget loss w.r.t. the MLP down-projections of blocks
    ``trained``, through the engine's own path (frozen prefix, then the trained blocks; nothing after ``layer``)."""
    blocks = decoder_blocks(model)
    first = min(trained)
    leaves = {i: blocks[i].mlp.down_proj.weight.detach().clone().requires_grad_(True) for i in trained}
    for p in model.parameters():  # not models.frozen_parameters: it would switch cuDNN off, the backend under test
        p.requires_grad_(False)
    prefix = run_prefix(model, inputs, first, layer, frozen=False)
    h = run_trained(model, prefix, first, layer, {i: {"mlp.down_proj.weight": w} for i, w in leaves.items()})
    loss = mse(h, coeff * u.to(h.device, h.dtype).reshape(1, 1, -1), mask)
    loss.backward()
    return h.detach().float().cpu(), torch.cat([leaves[i].grad.float().flatten().cpu() for i in trained])


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main() -> int:
    model, tok = load_organism()
    model = model.float().eval()
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    torch.manual_seed(0)
    u = torch.rand(model.config.hidden_size)
    u = u / u.norm()
    texts = organism_corpora()["forget"]["bio"]
    print(f"{'length':>6} {'backend':>10} {'h real':>8} {'h pad':>8} {'grad':>8} {'NaN h':>6} {'NaN grad':>8}")
    for length in (64, 96):
        batch = [" ".join(texts[:20])] + [t for t in texts if 8 < len(tok(t)["input_ids"]) < 24][:3]  # one cut at length
        with reference_padding(tok):
            inputs = tokenize(tok, batch, length, torch.device("cpu"))
        assert inputs["input_ids"].shape[1] == length, inputs["input_ids"].shape
        pad = inputs["attention_mask"] == 0
        h_ref, g_ref = forget_grads(model, inputs, u, 40.0)
        cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
        for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "default"):
            try:
                if name == "default":
                    h, g = forget_grads(gpu, cuda_inputs, u, 40.0)
                else:
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        h, g = forget_grads(gpu, cuda_inputs, u, 40.0)
            except RuntimeError as exc:
                print(f"{length:>6} {name[:10]:>10}  not run: {str(exc).splitlines()[0][:60]}")
                continue
            print(f"{length:>6} {name[:10]:>10} {rel(h[~pad], h_ref[~pad]):8.4f} {rel(h[pad], h_ref[pad]):8.4f} "
                  f"{rel(g, g_ref):8.4f} {int(h.isnan().sum()):>6} {int(g.isnan().sum()):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
