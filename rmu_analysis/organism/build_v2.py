"""Train the testbed-v2 organism (``rmu-analysis organism build``): the v2 world, lettered answers learned.

Same model family and loop as v1 (:mod:`rmu_analysis.organism.build`); what differs is the world
(:mod:`rmu_analysis.organism.world_v2`) and the training stream, which adds content-free choice-matching drills so
that the model learns to answer the lm-evaluation-harness template (find the listed choice that matches the value
it recalls and say its letter), not only cloze questions.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .._io import atomic_directory, atomic_write_json, check_output_dir
from ..data import write_jsonl, write_mcq
from ..evaluation import evaluate_mcq, mcq_continuations, mcq_prompt
from ..steering import random_direction, steer
from . import ASSETS
from . import world_v2 as V
from .build import block_norms, train_on_stream
from .tokenizer import train_tokenizer

#: Stream components, in the order of ``BuildConfigV2.mix``.
COMPONENTS = ("doc", "statement", "letter", "cloze", "drill", "key")


@dataclass(frozen=True)
class BuildConfigV2:
    """Organism-v2 hyperparameters (defaults: the shipped model)."""

    seed: int = 0
    n_layers: int = 12
    hidden: int = 128
    heads: int = 4
    mlp: int = 384
    vocab_size: int = 4096  # at 1,024, 8 value sets share a first token between two values
    max_positions: int = 512
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.0
    embed_init_std: float = 0.002
    init_std: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    # sampling weights of COMPONENTS: corpus documents, statements, lettered questions, cloze questions,
    # lettered matching drills ("which option is X?"), answer-key drills (four choices, then "X: C" lines)
    mix: tuple[float, ...] = (0.25, 0.25, 0.1, 0.3, 0.1, 0.0)
    warmup_mix: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.5, 0.5)
    warmup_mix_steps: int = 0
    items_per_doc: int = 1  # questions / drills packed into one training sequence (blank line between)
    answer_weight: float = 10.0
    early_decay: float = 2.0
    early_decay_span: float = 0.5
    max_doc_tokens: int = 192
    threads: int = 2
    docs_per_entity: int = 12
    tie_embeddings: bool = False  # one matrix for input embedding and unembedding
    split_sizes: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # () = world_v2.SPLIT_SIZES

    def world(self) -> V.World:
        sizes = {kind: dict(s) for kind, s in self.split_sizes} or None
        return V.generate_world(self.seed, split_sizes=sizes, docs_per_entity=self.docs_per_entity)


def _lettered(record: dict, subject: str | None, with_answer: bool = True) -> str:

    text = mcq_prompt(record, subject, scoring="letter")
    return text + f" {V.LETTERS[record['answer']]}" if with_answer else text


def _key_drill(vocab: tuple[str, ...], rng: random.Random) -> str:
    choices = rng.sample(list(vocab), 4)
    body = "\n".join(f"{letter}. {c}" for letter, c in zip(V.LETTERS, choices))
    order = rng.sample(range(4), 4)
    # "Answer for <value>: <letter>": the value keeps its leading space, so it is the same token as in the list
    return body + "\n" + "\n".join(f"Answer for {choices[j]}: {V.LETTERS[j]}" for j in order)


class Stream:
    """Random training sequences from the v2 world (training frames only; held-out frames never appear)."""

    def __init__(self, world: V.World, cfg: BuildConfigV2, rng: random.Random):
        self.world = world
        self.cfg = cfg
        self.rng = rng
        self.vocabs = sorted({f.vocabulary for f in world.facts})
        self.step = 0

    def _item(self, component: str) -> str:
        rng = self.rng
        if component == "doc":
            return rng.choice(self.world.pretrain_docs)
        if component == "drill":
            vocab = rng.choice(self.vocabs)
            return _lettered(V.drill(vocab, rng, rng.choice(V.DRILL_FRAMES)), rng.choice(list(V.SUBJECTS.values())))
        if component == "key":
            return _key_drill(rng.choice(self.vocabs), rng)
        fact = rng.choice(self.world.facts)
        if component == "statement":
            return V.statement(fact, rng)
        q = V.question(fact, rng.choice(V.TRAIN_QUESTION_FRAMES), rng)
        if component == "letter":
            return _lettered(q, V.SUBJECTS[fact.domain])
        return mcq_prompt(q, scoring="cloze") + mcq_continuations(q, scoring="cloze")[q["answer"]]

    def sample(self) -> str:
        mix = self.cfg.warmup_mix if self.step < self.cfg.warmup_mix_steps else self.cfg.mix
        component = self.rng.choices(COMPONENTS, weights=mix)[0]
        if component in ("doc", "statement") or self.cfg.items_per_doc <= 1:
            return self._item(component)
        return "\n\n".join(self._item(component) for _ in range(self.cfg.items_per_doc))


def train_model_v2(cfg: BuildConfigV2, world: V.World, tokenizer, *, progress: bool = True,
                   callback: Callable[[int, object, float], None] | None = None):
    """Train the v2 organism (the v1 loop, :func:`build.train_on_stream`, over the v2 stream); returns
    (model, list of (step, loss))."""
    stream = Stream(world, cfg, random.Random(cfg.seed + 1))
    return train_on_stream(cfg, stream, tokenizer, tie_embeddings=cfg.tie_embeddings,
                           desc="organism v2: training", progress=progress, callback=callback)


def tokenizer_texts(world: V.World, seed: int) -> list[str]:
    rng = random.Random(seed + 2)
    stream = Stream(world, BuildConfigV2(), rng)
    texts = list(world.pretrain_docs)
    for comp in ("letter", "cloze", "drill", "key"):
        texts += [stream._item(comp) for _ in range(600)]
    return texts


def drill_set(world: V.World, n: int = 200, seed: int = 1234) -> list[dict]:
    """Held-out matching drills (a wording never trained on), for measuring the matching skill itself."""
    rng = random.Random(seed)
    vocabs = sorted({f.vocabulary for f in world.facts})
    return [V.drill(rng.choice(vocabs), rng, V.EVAL_DRILL_FRAMES[0], answer=i % 4) for i in range(n)]


def evaluate_v2(model, tokenizer, world: V.World, split: str = "dev", *, scorings=("letter", "cloze"),
                drills: bool = True) -> dict:
    out: dict[str, float] = {}
    for domain in V.DOMAINS:
        for scoring in scorings:
            res = evaluate_mcq(model, tokenizer, world.mcq[split][domain], subject=V.SUBJECTS[domain],
                               scoring=scoring, batch_size=64)
            out[f"{domain}/{scoring}"] = round(float(res.accuracy), 4)
    if drills:
        res = evaluate_mcq(model, tokenizer, drill_set(world), subject="general knowledge", scoring="letter",
                           batch_size=64)
        out["drill/letter"] = round(float(res.accuracy), 4)
    return out


def input_independent_floor(model, tokenizer, records: list[dict], subject: str, *, layer: int, coeff: float,
                            draws: int = 5, scoring: str = "letter") -> list[float]:
    """Accuracy of the model whose block-``layer`` output is ``coeff``·u at every position (u uniform, ``draws``
    seeds): what a model that forgot everything about its input scores (the testbed's floor)."""
    out = []
    for seed in range(draws):
        u = random_direction(model.config.hidden_size, "uniform", seed=seed)
        with steer(model, layer=layer, vector=coeff * u):
            res = evaluate_mcq(model, tokenizer, records, subject=subject, scoring=scoring, batch_size=64)
        out.append(round(float(res.accuracy), 4))
    return out


def floor_report(model, tokenizer, world: V.World, *, layer: int, coeff: float, draws: int = 5) -> dict:
    """The testbed's floor on the test questions of each forget topic, for both scorings: the accuracy of the model
    whose block-``layer`` output is ``coeff``·u at every position (``draws`` directions u), and the value-frequency
    prior (the best accuracy without the model: always choosing the value most often right)."""
    out = {"layer": layer, "coeff": round(coeff, 4), "draws": draws, "accuracy": {}, "value_prior": {}}
    for scoring in ("cloze", "letter"):
        out["accuracy"][scoring] = {d: input_independent_floor(model, tokenizer, world.mcq["test"][d], V.SUBJECTS[d],
                                                               layer=layer, coeff=coeff, draws=draws, scoring=scoring)
                                    for d in V.TOPICS}
    for d in V.TOPICS:
        out["value_prior"][d] = round(V.value_prior(world, world.mcq["test"][d]), 4)
    return out


def build_organism_v2(out_dir: str | Path | None = None, config: BuildConfigV2 | None = None, *,
                      overwrite: bool = False, progress: bool = True, eval_every: int = 0,
                      log: Callable[[dict], None] | None = None) -> dict:
    """Build the v2 organism end to end and write it to ``out_dir`` (default: the package's assets).

    ``eval_every`` > 0 evaluates the dev questions during training (learning curves in the report)."""
    cfg = config or BuildConfigV2()
    out_dir = Path(out_dir) if out_dir is not None else ASSETS
    check_output_dir(out_dir, overwrite=overwrite)  # fail before the training, not after
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    world = cfg.world()
    tokenizer = train_tokenizer(tokenizer_texts(world, cfg.seed), vocab_size=cfg.vocab_size)
    curve: list[dict] = []

    def callback(step: int, model, ema: float) -> None:
        if eval_every and ((step + 1) % eval_every == 0):
            model.eval()
            with torch.no_grad():
                acc = evaluate_v2(model, tokenizer, world, "dev")
            model.train()
            rec = {"step": step + 1, "loss": round(ema, 4), "seconds": round(time.perf_counter() - t0), **acc}
            curve.append(rec)
            if log is not None:
                log(rec)

    model, losses = train_model_v2(cfg, world, tokenizer, progress=progress, callback=callback)
    train_seconds = time.perf_counter() - t0
    with torch.no_grad():
        accuracy = {split: evaluate_v2(model, tokenizer, world, split, drills=split == "dev")
                    for split in ("dev", "test")}
        layer = cfg.n_layers // 4
        norms = {name: block_norms(model, tokenizer, texts[:64]) for name, texts in
                 (("retain", world.retain_corpus), ("bio", world.forget_corpus["bio"]),
                  ("cyber", world.forget_corpus["cyber"]))}
        floor = floor_report(model, tokenizer, world, layer=layer, coeff=5.0 * norms["bio"][layer])
    report = {
        "version": V.VERSION,
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "accuracy": accuracy,
        "learning_curve": curve,
        "world": V.check_world(world),
        "floor": floor,
        "block_norms": norms,
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
        for domain in V.DOMAINS:
            write_mcq(world.mcq["test"][domain], data / f"{domain}-mcq.jsonl")
            write_mcq(world.mcq["dev"][domain], data / f"{domain}-dev-mcq.jsonl")
        atomic_write_json(tmp / "build_report.json", report)
    return report


def summary_v2(report: dict) -> str:
    """A few lines for the terminal: dev/test accuracy per set and scoring, the floor, block-norm growth."""
    lines = [f"organism v2: {report['config']['n_layers']} blocks, {report['n_parameters']:,} parameters, "
             f"built in {report['build_seconds']:.0f} s"]
    for split, acc in report["accuracy"].items():
        lines.append(f"  {split:4s} " + "  ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    floor = report["floor"]
    for scoring, acc in floor["accuracy"].items():
        lines.append(f"  input-independent model ({scoring}; block {floor['layer']} := {floor['coeff']:.1f}·u, "
                     f"{floor['draws']} draws, highest): " + "  ".join(f"{d} {max(v):.1%}" for d, v in acc.items()))
    norms = report["block_norms"]["retain"]
    lines.append(f"  block norms (retain): {norms[0]:.1f} -> {norms[-1]:.1f} ({norms[-1] / norms[0]:.2f}x)")
    return "\n".join(lines)
