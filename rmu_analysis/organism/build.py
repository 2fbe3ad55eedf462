"""Train the model organism from scratch on the CPU (``rmu-analysis organism build``).

One readable training loop: generate the world, train a byte-level BPE tokenizer, train a small
``LlamaForCausalLM`` on a stream that mixes corpus documents, single fact statements and lettered
multiple-choice questions in *training* frames, then evaluate on the held-out questions and write everything
(safetensors weights, tokenizer, data files, build report) atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets
from transformers import LlamaConfig, LlamaForCausalLM

from .._io import atomic_directory, atomic_write_json, check_output_dir
from ..activations import token_norms
from ..data import write_jsonl, write_mcq
from ..evaluation import evaluate_mcq
from . import ASSETS
from . import world as W
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    """Organism hyperparameters. The defaults are those of the shipped model."""

    seed: int = 0
    n_layers: int = 12
    hidden: int = 128
    heads: int = 4
    mlp: int = 384
    vocab_size: int = 1024
    max_positions: int = 512
    steps: int = 1800
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.0
    embed_init_std: float = 0.002
    init_std: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    # sampling weights: corpus documents, statements, lettered questions, cloze questions
    mix: tuple[float, float, float, float] = (0.25, 0.25, 0.15, 0.35)
    answer_weight: float = 10.0  # loss weight of the answer letter after "Answer:" in lettered questions
    # decoupled weight decay on the attention/MLP output projections, largest at block 0 and falling linearly to
    # 0 at block ``n_layers * early_decay_span``: keeps the first blocks from writing most of the residual norm
    early_decay: float = 2.0
    early_decay_span: float = 0.5
    max_doc_tokens: int = 128
    threads: int = 2
    n_entities: tuple[tuple[str, int], ...] = ()
    forget_docs: int = 400
    retain_docs: int = 800
    balanced_values: bool = False  # see world.generate_world; the shipped organism: False

    def world(self) -> W.World:
        return W.generate_world(self.seed, dict(self.n_entities) or None, forget_docs=self.forget_docs,
                                retain_docs=self.retain_docs, balanced_values=self.balanced_values)


def model_config(cfg: BuildConfig, vocab_size: int, tokenizer):
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        initializer_range=cfg.init_std, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


class _Stream:
    """Random training documents: corpus text, one-fact statements and lettered questions (training frames)."""

    def __init__(self, world: W.World, cfg: BuildConfig, rng: random.Random):
        self.docs = world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus
        self.facts = world.facts
        self.mix = cfg.mix
        self.rng = rng

    def sample(self) -> str:
        r = self.rng.random()
        if r < self.mix[0]:
            return self.rng.choice(self.docs)
        fact = self.rng.choice(self.facts)
        if r < self.mix[0] + self.mix[1]:
            return W.statement(fact, self.rng)
        if r < self.mix[0] + self.mix[1] + self.mix[2]:
            return W.training_question(fact, self.rng, "letter")
        return W.training_question(fact, self.rng, "cloze")


def training_batches(stream: _Stream, tokenizer, cfg: BuildConfig):
    """Length-bucketed batches: draw 4 batches' worth of documents, sort by length, split."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    while True:
        texts = [stream.sample() for _ in range(4 * cfg.batch_size)]
        ids = [x[: cfg.max_doc_tokens - 1] + [eos] for x in tokenizer(texts)["input_ids"]]
        ids.sort(key=len)
        chunks = [ids[i: i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
        stream.rng.shuffle(chunks)
        for chunk in chunks:
            T = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for i, x in enumerate(chunk):
                input_ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            labels = input_ids.masked_fill(mask == 0, -100)
            yield input_ids, mask, labels


def param_groups(model, cfg: BuildConfig) -> list[dict]:
    """AdamW groups: ``cfg.weight_decay`` everywhere, plus a depth-decreasing decay on early output projections."""
    span = max(1.0, cfg.n_layers * cfg.early_decay_span)
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        wd = cfg.weight_decay
        parts = name.split(".")
        if "layers" in parts and (name.endswith("o_proj.weight") or name.endswith("down_proj.weight")):
            i = int(parts[parts.index("layers") + 1])
            wd += cfg.early_decay * max(0.0, 1.0 - i / span)
        groups.setdefault(round(wd, 6), []).append(p)
    return [{"params": ps, "weight_decay": wd} for wd, ps in sorted(groups.items())]


def train_model(cfg: BuildConfig, world: W.World, tokenizer, *, progress: bool = True,
                callback: Callable[[int, object, float], None] | None = None):
    """Train the organism's LlamaForCausalLM; returns (model, list of (step, loss))."""
    stream = _Stream(world, cfg, random.Random(cfg.seed + 1))
    return train_on_stream(cfg, stream, tokenizer, progress=progress, callback=callback)


def train_on_stream(cfg, stream, tokenizer, *, tie_embeddings: bool = False, desc: str = "organism: training",
                    progress: bool = True, callback: Callable[[int, object, float], None] | None = None):
    """The organism's training loop over any document ``stream`` (an object with ``sample()`` and ``rng``; its
    ``step`` attribute, when it has one, is kept at the current step): AdamW with warm-up and cosine decay, the
    answer letter after ``:`` weighted ``cfg.answer_weight``. Returns (model, list of (step, loss))."""
    torch.manual_seed(cfg.seed)
    config = model_config(cfg, len(tokenizer), tokenizer)
    config.tie_word_embeddings = tie_embeddings
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, cfg.embed_init_std)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
    letters = torch.tensor([tokenizer(f" {x}", add_special_tokens=False)["input_ids"][0] for x in W.LETTERS])
    colon = tokenizer(":", add_special_tokens=False)["input_ids"][0]

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    batches = training_batches(stream, tokenizer, cfg)
    losses: list[tuple[int, float]] = []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    ema = None
    for step in bar:
        if hasattr(stream, "step"):
            stream.step = step
        input_ids, mask, labels = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=-100, reduction="none").view_as(target)
        weight = (target != -100).float()
        is_answer = torch.isin(target, letters) & (input_ids[:, :-1] == colon)
        weight = weight + (cfg.answer_weight - 1.0) * is_answer.float()
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0 or step == cfg.steps - 1:
            losses.append((step, round(ema, 4)))
            bar.set_postfix(loss=f"{ema:.3f}")
        if callback is not None:
            callback(step, model, ema)
    model.eval()
    return model, losses


def block_norms(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """Mean token norm of every block's raw output (``activations.token_norms``: the last block's too, not the
    final-normed ``hidden_states[-1]``), over every token of ``texts`` but padding and BOS, to 4 decimals."""
    norms = token_norms(model, list(texts), "all", tokenizer=tokenizer, exclude_bos=True, batch_size=batch_size)
    return [round(float(norms[l].mean()), 4) for l in sorted(norms)]


def evaluate_organism(model, tokenizer, mcq: dict[str, list[dict]]) -> dict:
    """Letter and cloze accuracy (to 4 decimals) on the held-out question sets ``mcq`` (domain -> records, e.g.
    ``world.mcq`` or ``organism_mcq()``), scored as lm-evaluation-harness does."""
    acc: dict[str, dict[str, float]] = {}
    for domain in W.DOMAINS:
        acc[domain] = {}
        for scoring in ("letter", "cloze"):
            res = evaluate_mcq(model, tokenizer, mcq[domain], subject=W.SUBJECTS[domain], scoring=scoring,
                               batch_size=32)
            acc[domain][scoring] = round(float(res.accuracy), 4)
    return acc


def build_organism(out_dir: str | Path | None = None, config: BuildConfig | None = None, *,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Build the organism end to end and write it to ``out_dir`` (default: the package's assets). Returns the report."""
    cfg = config or BuildConfig()
    out_dir = Path(out_dir) if out_dir is not None else ASSETS
    check_output_dir(out_dir, overwrite=overwrite)  # fail before ten minutes of training, not after
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    world = cfg.world()
    tok_texts = world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus
    rng = random.Random(cfg.seed + 2)
    tok_texts += [W.training_question(f, rng) for f in world.facts]
    tokenizer = train_tokenizer(tok_texts, vocab_size=cfg.vocab_size)
    model, losses = train_model(cfg, world, tokenizer, progress=progress)
    train_seconds = time.perf_counter() - t0
    accuracy = evaluate_organism(model, tokenizer, world.mcq)
    norm_sample = world.retain_corpus[:64]
    report = {
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "accuracy": accuracy,
        "block_norms": {
            "retain": block_norms(model, tokenizer, norm_sample),
            "bio": block_norms(model, tokenizer, world.forget_corpus["bio"][:64]),
            "cyber": block_norms(model, tokenizer, world.forget_corpus["cyber"][:64]),
        },
        "n_questions": {d: len(world.mcq[d]) for d in W.DOMAINS},
        "loss_curve": losses,
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": cfg.threads,
        "torch_version": torch.__version__,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        data = tmp / "data"
        write_jsonl(world.forget_corpus["bio"], data / "bio-forget-corpus.jsonl", field="text")
        write_jsonl(world.forget_corpus["cyber"], data / "cyber-forget-corpus.jsonl", field=None)
        write_jsonl(world.retain_corpus, data / "retain-corpus.jsonl", field="text")
        for domain in W.DOMAINS:
            write_mcq(world.mcq[domain], data / f"{domain}-mcq.jsonl")
        atomic_write_json(tmp / "build_report.json", report)
    return report


def main_summary(report: dict) -> str:
    acc = report["accuracy"]
    norms = report["block_norms"]["retain"]
    lines = [f"organism: {report['config']['n_layers']} blocks, {report['n_parameters']:,} parameters, "
             f"built in {report['build_seconds']:.0f} s"]
    for d, a in acc.items():
        lines.append(f"  {d:8s} letter {a['letter']:.1%}  cloze {a['cloze']:.1%}")
    lines.append("  block norms (retain, BOS excluded): " + " ".join(f"{x:.1f}" for x in norms)
                 + f"  (last/first = {norms[-1] / norms[0]:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(build_organism(progress=True)["accuracy"], indent=2))
