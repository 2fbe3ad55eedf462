"""Pieces shared by the reference implementation, the engine and the baselines.

Data (topics, batches, tokenisation as the reference does it), the selection of trained tensors, the control
vectors, the two loss conventions and the per-step log row. Nothing here runs a model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._batching import context_length
from ..activations import mean_token_norm
from ..models import block_path, check_layer, decoder_blocks, down_proj_pattern, num_blocks


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped before applying that step's update."""


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Corpora:
    """Forget texts per topic and the retain texts paired with each topic (same order)."""

    topics: tuple[str, ...]
    forget: tuple[tuple[str, ...], ...]
    retain: tuple[tuple[str, ...], ...]


def prepare_corpora(forget: Any, retain: Any) -> Corpora:
    """Normalise the data interface.

    ``forget``: a dict topic -> list of texts, a list of lists (topics ``topic0``, ``topic1`` ...) or one list
    of texts (a single topic ``forget``). ``retain``: one list of texts used with every topic (the reference
    uses the same wikitext for bio and cyber), or one list per topic (a dict with the forget topics as keys,
    or a list of lists).

    Every text must be a string: a bare string where a list of texts belongs (it would be read one character
    per text), ``None`` or any other type is a ``TypeError`` naming where it is. Empty and whitespace-only texts
    hold nothing but BOS and padding (Adaptive RMU would then scale c by the BOS norm): they are dropped, with
    one warning for all of them; a corpus left with no text is a ``ValueError``.
    """
    if isinstance(forget, Mapping):
        topics = tuple(str(t) for t in forget)
        forget_lists = [_text_list(forget[t], f"forget[{t!r}]") for t in forget]
    elif _is_list_of_lists(forget):
        forget_lists = [_text_list(f, f"forget[{i}]") for i, f in enumerate(forget)]
        topics = tuple(f"topic{i}" for i in range(len(forget_lists)))
    else:
        topics, forget_lists = ("forget",), [_text_list(forget, "forget")]
    if not topics:
        raise ValueError("forget has no topics: pass at least one non-empty list of forget texts")

    if isinstance(retain, Mapping):
        missing = [t for t in topics if t not in retain]
        extra = [str(t) for t in retain if t not in topics]
        if missing or extra:
            raise ValueError(
                f"retain topics {list(map(str, retain))} do not match the forget topics {list(topics)} "
                f"(missing {missing}, unexpected {extra}): pass one retain list per forget topic, or one list for all"
            )
        retain_lists = [_text_list(retain[t], f"retain[{t!r}]") for t in topics]
        retain_names = [f"retain[{t!r}]" for t in topics]
    elif _is_list_of_lists(retain):
        if len(retain) != len(topics):
            raise ValueError(
                f"retain has {len(retain)} lists but forget has {len(topics)} topics {list(topics)}: "
                "pass one retain list per forget topic, or a single list for all"
            )
        retain_lists = [_text_list(r, f"retain[{i}]") for i, r in enumerate(retain)]
        retain_names = [f"retain[{i}]" for i in range(len(retain))]
    else:
        retain_lists = [_text_list(retain, "retain")] * len(topics)
        retain_names = ["retain"] * len(topics)

    dropped: dict[str, int] = {}

    def non_empty(texts: list[str], name: str, what: str) -> tuple[str, ...]:
        kept = tuple(str(t) for t in texts if t.strip())
        if len(kept) < len(texts):
            dropped[name] = len(texts) - len(kept)
        if not kept:
            why = "is empty" if not texts else "holds only empty or whitespace-only texts"
            raise ValueError(f"{what} {why}: pass at least one non-empty text")
        return kept

    forget_out = tuple(
        non_empty(f, f"forget[{t!r}]", f"the forget corpus of topic {t!r}") for t, f in zip(topics, forget_lists)
    )
    retain_out = tuple(
        non_empty(r, name, f"the retain corpus paired with topic {t!r}")
        for t, r, name in zip(topics, retain_lists, retain_names)
    )
    if dropped:
        warnings.warn(
            f"dropped {sum(dropped.values())} empty or whitespace-only texts "
            f"({', '.join(f'{name}: {n}' for name, n in dropped.items())}): they hold no token but BOS and padding",
            stacklevel=3,
        )
    return Corpora(topics=topics, forget=forget_out, retain=retain_out)


def _text_list(value: Any, name: str) -> list[str]:
    """``value`` as a list of strings, or a ``TypeError`` naming ``name`` and the offending entry."""
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{name} is a single {type(value).__name__}, not a list of texts (it would be read one character per "
            f"text): pass [text]"
        )
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of texts (strings), got {type(value).__name__}")
    texts = list(value)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {text!r:.60} ({type(text).__name__}): every text must be a string")
    return texts


def _is_list_of_lists(obj: Any) -> bool:
    """A non-empty sequence whose entries all are lists/tuples (one list of texts per topic)."""
    return (
        isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and len(obj) > 0
        and all(isinstance(f, (list, tuple)) for f in obj)
    )


def step_batch(step: int, n_topics: int) -> tuple[int, int]:
    """(topic index, batch index) of a step: topics alternate as in the reference."""
    return step % n_topics, step // n_topics


def batch_texts(texts: Sequence[str], batch: int, batch_size: int) -> list[str]:
    """Batch ``batch`` of ``texts`` (consecutive chunks of ``batch_size``; the last one may be shorter)."""
    return list(texts[batch * batch_size : (batch + 1) * batch_size])


def runnable_steps(corpora: Corpora, steps: int, batch_size: int) -> int:
    """Steps until the first step whose forget or retain batch does not exist (warns when < ``steps``)."""
    n = len(corpora.topics)
    for step in range(steps):
        topic, batch = step_batch(step, n)
        if batch * batch_size >= min(len(corpora.forget[topic]), len(corpora.retain[topic])):
            warnings.warn(
                f"the data run out at step {step} (topic {corpora.topics[topic]!r} has no batch {batch} of "
                f"{batch_size} texts): running {step} of {steps} steps",
                stacklevel=3,
            )
            return step
    return steps


@contextlib.contextmanager
def reference_padding(tokenizer) -> Iterator[Any]:
    """Left padding, right truncation and (if missing) EOS as pad, as the reference; restored on exit."""
    saved = (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token)
    try:
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "right"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        yield tokenizer
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved[0], saved[1]
        if saved[2] is None:
            tokenizer.pad_token = None


def sequence_lengths(model: nn.Module, config, topics: Sequence[str]) -> tuple[tuple[int, ...], int]:
    """(forget truncation length per topic, retain truncation length), cut to the model's positions.

    A length beyond ``max_position_embeddings`` would run the model past its context (or crash in the position
    embedding). The default lengths (``forget_max_length=None``: 512 for the first topic, 768 for the others;
    ``retain_max_length`` 512) are cut silently; a length the config sets is cut with a warning.
    """
    forget = tuple(config.per_topic("forget_max_length", len(topics), tuple(topics)))
    retain = config.retain_max_length
    limit = context_length(model)
    if limit is None:
        return forget, retain
    default_retain = next(f.default for f in dataclasses.fields(config) if f.name == "retain_max_length")
    cut = []
    if config.forget_max_length is not None and max(forget) > limit:
        cut.append(f"forget_max_length {config.forget_max_length}")
    if retain > limit and retain != default_retain:
        cut.append(f"retain_max_length {retain}")
    if cut:
        warnings.warn(
            f"{' and '.join(cut)} exceed the model's {limit} positions: texts are cut at {limit} tokens", stacklevel=3
        )
    return tuple(min(n, limit) for n in forget), min(retain, limit)


def tokenize(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise one batch (call inside ``reference_padding``): input ids and attention mask on ``device``."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


# ------------------------------------------------------------------------------------ what to train
@dataclass(frozen=True)
class TrainedTensor:
    """One trained tensor: its block, its name relative to the block and in the model."""

    block: int
    name: str  # relative to the block, e.g. "mlp.down_proj.weight"
    full_name: str  # in model.named_parameters(), e.g. "model.layers.5.mlp.down_proj.weight"


def select_trained(model: nn.Module, layers: Sequence[int], pattern: str | None) -> list[TrainedTensor]:
    """Parameters of blocks ``layers`` whose block-relative name matches ``pattern`` (regex, ``re.search``).

    ``pattern`` None means the architecture's MLP down-projection (``models.down_proj_pattern``).
    """
    pattern = pattern if pattern is not None else down_proj_pattern(model)
    regex = re.compile(pattern)
    blocks = decoder_blocks(model)
    prefix = block_path(model)
    out = []
    offloaded = []
    for i in layers:
        for name, param in blocks[i].named_parameters():
            if regex.search(name):
                out.append(TrainedTensor(i, name, f"{prefix}.{i}.{name}"))
                if param.device.type == "meta":
                    offloaded.append(f"{prefix}.{i}.{name}")
    if not out:
        names = sorted({n for n, _ in blocks[layers[0]].named_parameters()})
        raise ValueError(
            f"param_pattern {pattern!r} matches no parameter of blocks {list(layers)}; "
            f"block parameter names look like: {', '.join(names[:8])}"
        )
    if offloaded:  # accelerate's cpu/disk offload keeps them on "meta" and reloads them at every forward
        raise ValueError(
            f"trained tensors {offloaded[:3]}{' ...' if len(offloaded) > 3 else ''} are offloaded (device 'meta' under "
            "device_map): the tensors that are trained must sit on a device. Give those blocks GPU memory, e.g. "
            "load_model(path, device_map='auto', max_memory={0: '70GiB', 'cpu': '200GiB'}), or place blocks "
            "first..l on a GPU with an explicit device_map; blocks outside first..l may stay offloaded"
        )
    return out


def mlp_tensors(model: nn.Module) -> list[TrainedTensor]:
    """Every MLP parameter of every block (for the baselines' ``params="mlp"``)."""
    pattern = r"(^|\.)(mlp|ffn|feed_forward)\.|^fc[12]\."
    return select_trained(model, list(range(num_blocks(model))), pattern)


def resolve_layers(model: nn.Module, config) -> tuple[int, tuple[int, ...]]:
    """Validate block l and the trained blocks against the model (clear errors before training)."""
    layer = check_layer(model, config.layer)
    if config.layer < 0:
        raise ValueError(f"layer must be a non-negative block index, got {config.layer}")
    trained = config.resolved_trained_layers()
    for t in trained:
        check_layer(model, t, what="trained layer")
        if t < 0:
            raise ValueError(f"trained_layers must be non-negative block indices, got {trained}")
    return layer, trained


# ---------------------------------------------------------------------------------- control vectors
def draw_control_vectors(n: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The reference construction (Eq. 1; docs/paper.md): per topic ``torch.rand(1, 1, d)`` from a generator seeded with
    ``seed``, divided by its norm. Returns unit vectors of shape (d,) in ``dtype`` on ``device``.

    Drawn on the CPU in float32 and then cast and moved, so one seed gives the same vectors on every device
    and in every precision (the reference draws on the model's device in its dtype: CUDA's generator gives
    other numbers than the CPU's for the same seed, which made a GPU run incomparable with a CPU run)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        v = torch.rand(1, 1, dim, dtype=torch.float32, generator=gen)
        out.append((v / torch.norm(v)).reshape(dim).to(device=device, dtype=dtype))
    return out


def prepare_control_vectors(
    given: Any, topics: tuple[str, ...], dim: int, seed: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Drawn vectors, or the caller's (a dict topic -> vector or a sequence, one per topic), used as given."""
    if given is None:
        return draw_control_vectors(len(topics), dim, seed, dtype, device)
    if isinstance(given, Mapping):
        missing = [t for t in topics if t not in given]
        if missing:
            raise ValueError(f"control_vectors has no vector for topics {missing}: give one per topic {list(topics)}")
        vectors = [given[t] for t in topics]
    else:
        vectors = list(given) if not isinstance(given, torch.Tensor) or given.dim() > 1 else [given]
        if len(vectors) != len(topics):
            raise ValueError(
                f"{len(vectors)} control vectors for {len(topics)} topics {list(topics)}: give one per topic"
            )
    out = []
    for topic, v in zip(topics, vectors):
        v = torch.as_tensor(v).detach().reshape(-1)
        if v.numel() != dim:
            raise ValueError(f"the control vector of topic {topic!r} has {v.numel()} entries; the model's width is {dim}")
        if not torch.isfinite(v).all() or float(v.float().norm()) == 0.0:
            raise ValueError(f"the control vector of topic {topic!r} is zero or not finite")
        if abs(float(v.float().norm()) - 1.0) > 1e-2:
            warnings.warn(
                f"the control vector of topic {topic!r} has norm {float(v.float().norm()):.3g}, not 1: it is used "
                "as given (the target is coefficient × vector)",
                stacklevel=3,
            )
        out.append(v.to(device=device, dtype=dtype).clone())
    return out


# ---------------------------------------------------------------------------------- retain noise
def noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of a run's retain noise (``retain_noise``, arXiv 2501.19202): seeded from ``seed`` through
    a hash, so its stream is apart from the control vectors' (drawn from ``seed`` itself)."""
    digest = hashlib.sha256(f"retain-noise/{int(seed)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def add_retain_noise(hidden: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``hidden`` [B, T, d] plus Gaussian noise with per-token std ``scale`` · ||h_t|| / √d (an expected norm
    ≈ ``scale`` · ||h_t||), a new tensor. The standard normals are drawn on the CPU in float32 from ``generator``
    and moved, so one seed gives the same noise on every device; the sum is formed in float32 and cast back."""
    z = torch.randn(hidden.shape, generator=generator, dtype=torch.float32).to(hidden.device)
    h = hidden.float()
    std = h.norm(dim=-1, keepdim=True) * (scale / math.sqrt(h.shape[-1]))
    return (h + std * z).to(hidden.dtype)


# ---------------------------------------------------------------------------------------- the losses
def loss_masks(inputs: dict[str, torch.Tensor], convention: str, bos_token_id: int | None):
    """Positions each loss covers: ``(forget_mask, retain_mask)``, or ``(None, None)`` for every position.

    "reference": every position (padding and BOS included). "masked": real tokens; the forget mask also
    drops a leading BOS (the attention-sink state is shared by every input and stays in the retain term).
    """
    if convention == "reference":
        return None, None
    mask = inputs["attention_mask"].bool()
    first_real = mask & (mask.long().cumsum(dim=1) == 1)
    is_bos = first_real & (inputs["input_ids"] == bos_token_id) if bos_token_id is not None else torch.zeros_like(mask)
    forget_mask = mask & ~is_bos
    return forget_mask, mask


def mse(acts: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over batch, positions and width; over ``mask``ed positions only when given."""
    target = target.expand_as(acts)
    if mask is None:
        return F.mse_loss(acts, target)
    m = mask.to(acts.device, acts.dtype).unsqueeze(-1)  # block l may sit on another device than the inputs
    return ((acts - target) ** 2 * m).sum() / (m.sum().clamp_min(1) * acts.shape[-1])


def mean_cosine(acts: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean cos(h, u) over the covered positions (the alignment of Fig. 2e–h)."""
    cos = F.cosine_similarity(acts.detach().float(), u.to(acts.device).float().reshape(1, 1, -1), dim=-1)
    if mask is None:
        return float(cos.mean())
    m = mask.to(cos.device).float()
    return float((cos * m).sum() / m.sum().clamp_min(1))


def check_finite(loss: float, step: int, topic: str, parts: dict[str, float]) -> None:
    """Raise ``NonFiniteLossError`` naming the step when the loss is NaN or infinite."""
    if not math.isfinite(loss):
        detail = ", ".join(f"{k} = {v:.4g}" for k, v in parts.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (topic {topic!r}): {detail}. The update of this step was not "
            "applied; lower the learning rate or the coefficient (c / β), or train in float32"
        )


def log_row(
    step: int, topic: str, forget_loss: float, retain_loss: float, alpha: float, coefficient: float,
    h_forget: torch.Tensor, h_retain: torch.Tensor, u: torch.Tensor, forget_mask, retain_mask,
) -> dict[str, Any]:
    """One log entry (Fig. 4 quantities): losses, coefficient, block-l norms, cos(h_forget, u)."""
    return {
        "step": step,
        "topic": topic,
        "forget_loss": forget_loss,
        "retain_loss": retain_loss,
        "loss": forget_loss + alpha * retain_loss,
        "coefficient": coefficient,
        "forget_norm": float(mean_token_norm(h_forget, forget_mask)),
        "retain_norm": float(mean_token_norm(h_retain, retain_mask)),
        "cos_forget_u": mean_cosine(h_forget, u, forget_mask),
    }
