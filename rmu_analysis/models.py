"""Loading causal LMs, finding their decoder blocks, and the model state a run may touch.

Layer convention (docs/paper.md): block ``l`` is 0-indexed and its output is the residual stream after the
block, i.e. ``hidden_states[l + 1]`` of an HF forward pass with ``output_hidden_states=True``.

Named models (``load_model("organism")``) come from a registry (:func:`register_model`): a name maps to a loader,
given as a callable or as ``"module:function"`` imported on first use, so this module imports no model of its own.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import re
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # attention-backend selection (torch >= 2.3)
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    sdpa_kernel = None

#: Name templates of the decoder-block list, matched against ``named_modules()`` (never positional).
BLOCK_TEMPLATES: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma3, Llava-style)
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
    "layers",  # a bare decoder (e.g. LlamaModel without the LM head)
)

#: Default name pattern (regex) of the MLP down-projection, the tensors RMU trains (Eq. 1).
DOWN_PROJ_PATTERNS: dict[str, str] = {
    "model.layers": r"mlp\.down_proj\.weight$",
    "model.language_model.layers": r"mlp\.down_proj\.weight$",
    "transformer.h": r"mlp\.(c_proj|dense_4h_to_h|fc_out)\.weight$",
    "gpt_neox.layers": r"mlp\.dense_4h_to_h\.weight$",
    "model.decoder.layers": r"fc2\.weight$",
    "transformer.blocks": r"ffn\.down_proj\.weight$",
    "layers": r"mlp\.down_proj\.weight$",
}


class UnsupportedModelError(TypeError):
    """The model's decoder blocks could not be found by any name template."""


def block_path(model: nn.Module) -> str:
    """Dotted name of the module list holding the decoder blocks (e.g. ``"model.layers"``)."""
    modules = dict(model.named_modules())
    for name in BLOCK_TEMPLATES:
        mod = modules.get(name)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return name
    raise UnsupportedModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of the module names "
        f"{', '.join(BLOCK_TEMPLATES)} is a non-empty ModuleList. Supported families: Llama/Mistral/Qwen2/Gemma "
        "(model.layers), GPT-2 (transformer.h), GPT-NeoX (gpt_neox.layers), OPT (model.decoder.layers)."
    )


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, found by name template (``model.layers.{num}``, ``transformer.h.{num}``...)."""
    return model.get_submodule(block_path(model))


def num_blocks(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(decoder_blocks(model))


def check_layer(model: nn.Module, layer: int, *, what: str = "layer") -> int:
    """Validate a 0-indexed block index (negative counts from the end) and return it as a non-negative int."""
    n = num_blocks(model)
    if isinstance(layer, bool) or not isinstance(layer, (int,)) and not (
        isinstance(layer, torch.Tensor) and layer.numel() == 1
    ):
        raise TypeError(f"{what} must be an int, got {type(layer).__name__}")
    layer = int(layer)
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(
            f"{what} {layer} is out of range: this model has {n} decoder blocks (0–{n - 1})"
        )
    return idx


def check_layers(model: nn.Module, layers: Any) -> list[int]:
    """Normalise ``"all"``, an int or an iterable of ints into a sorted list of valid block indices."""
    n = num_blocks(model)
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f'layers must be "all", an int or a list of ints, got {layers!r}')
        return list(range(n))
    if isinstance(layers, int):
        return [check_layer(model, layers)]
    out = sorted({check_layer(model, l) for l in layers})
    if not out:
        raise ValueError("layers is empty: pass at least one block index or \"all\"")
    return out


def down_proj_pattern(model: nn.Module) -> str:
    """Regex (on parameter names relative to a block) of the MLP down-projection for this architecture."""
    return DOWN_PROJ_PATTERNS[block_path(model)]


def forward_params(model: nn.Module) -> set[str]:
    """The names of the arguments ``model.forward`` takes (empty when they cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic callables
        return set()


def hidden_size(model: nn.Module) -> int:
    """Width d of the residual stream (the text config's ``hidden_size`` / ``n_embd``, else the embedding width)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return int(size) if size else int(model.get_input_embeddings().weight.shape[1])


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embedding (where input ids must go, also under ``device_map``)."""
    try:
        return model.get_input_embeddings().weight.device
    except Exception:  # pragma: no cover - exotic models
        return next(model.parameters()).device


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(table)} or a torch.dtype")
    return table[dtype]


#: Named models: name -> loader (a callable or ``"module:function"``) returning ``(model, tokenizer)``.
MODELS: dict[str, Callable[[], tuple] | str] = {"organism": "rmu_analysis.organism:load_organism"}


def register_model(name: str, loader: Callable[[], tuple] | str) -> None:
    """Make ``load_model(name)`` call ``loader()`` (a callable, or ``"module:function"`` imported on first use),
    which returns ``(model, tokenizer)``."""
    MODELS[str(name)] = loader


def _named_loader(name: str) -> Callable[[], tuple]:
    loader = MODELS[name]
    if isinstance(loader, str):
        module, _, function = loader.partition(":")
        loader = getattr(importlib.import_module(module), function)
    return loader


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id ("name" or "org/name")."""
    if name.startswith((".", "~")) or os.path.isabs(name) or (os.sep != "/" and os.sep in name):
        return True
    if not _HUB_ID.fullmatch(name):  # more than one "/", spaces, ...: no hub id looks like that
        return True
    head = name.split("/")[0]
    return "/" in name and os.path.lexists(head)  # "runs/typo" beside an existing ./runs


def _hub_offline() -> str | None:
    """Why the hub cannot be reached (an offline flag is set, its host does not resolve), or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host or "huggingface.co", 443)
    except OSError:
        return f"{host} does not resolve"
    return None


def load_model(
    name_or_path: str | os.PathLike = "organism",
    dtype: Any = None,
    device_map: Any = None,
    *,
    trust_remote_code: bool = False,
    tokenizer: bool = True,
):
    """Load a causal LM (and its tokenizer) from ``"organism"``, a local directory or a hub name.

    Returns ``(model, tokenizer)`` (``tokenizer`` is None when ``tokenizer=False``). The model is put in
    eval mode. ``trust_remote_code`` stays False unless the caller asks for it. ``device_map="auto"`` places
    a model that does not fit one GPU across devices (needs accelerate). A name that can only be a local path
    (``./x``, ``~/x``, an absolute path, ``a/b/c``, or ``runs/x`` beside an existing ``./runs``) and does not
    exist is a ``FileNotFoundError`` at once, without asking the hub; with ``HF_HUB_OFFLINE`` set, or when the
    hub's host does not resolve, a hub name is looked up in the local cache only (no request, no retries). A
    name registered with :func:`register_model` (``"organism"``) is loaded by its loader.
    """
    if str(name_or_path) in MODELS:
        model, tok = _named_loader(str(name_or_path))()
        torch_dtype = _resolve_dtype(dtype)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model, (tok if tokenizer else None)

    name = str(name_or_path)
    path = Path(name).expanduser()
    looks_local = os.path.lexists(path) or _looks_like_path(name)
    if looks_local and not path.exists():
        nearest = next((q for q in path.parents if q.exists()), None)
        hint = f" ({nearest} exists: check the rest of the path)" if nearest not in (None, Path("."), Path.cwd()) else ""
        raise FileNotFoundError(
            f"the model directory {path} does not exist{hint}: a local path is never looked up on the hub"
        )
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model directory: {path / 'config.json'} does not exist"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    torch_dtype = _resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    src = str(path) if looks_local else name
    offline = None if looks_local else _hub_offline()
    if offline is not None:  # the local cache only: no request, no retries
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except OSError as exc:
        if looks_local:
            raise
        where = (f"the hub is not reachable ({offline}) and it is not in the local cache" if offline
                 else "the hub did not serve it (no network here?)")
        raise OSError(
            f"could not load {src!r}: it is not a local directory, and {where}. Download the model elsewhere and "
            f"pass its local directory instead. Original error: {' '.join(str(exc).split())[:300]}"
        ) from exc
    model.eval()
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code,
                                        **({"local_files_only": True} if offline else {})) if tokenizer else None
    if tok is not None:
        ensure_pad_token(tok)
    return model, tok


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (as the reference code does), with a warning."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token before calling"
            )
        warnings.warn(
            f"tokenizer has no pad token: using its EOS token {tokenizer.eos_token!r} for padding", stacklevel=3
        )
        tokenizer.pad_token = tokenizer.eos_token


def attach_tokenizer(model: nn.Module, tokenizer: Any) -> nn.Module:
    """Keep ``tokenizer`` with ``model``: functions given no tokenizer use it (:func:`resolve_tokenizer`)."""
    model._rmu_tokenizer = tokenizer
    return model


def attached_tokenizer(model: nn.Module) -> Any:
    """The tokenizer kept with ``model`` by :func:`attach_tokenizer`, or None."""
    return getattr(model, "_rmu_tokenizer", None)


def resolve_tokenizer(model: nn.Module, tokenizer=None):
    """Return ``tokenizer`` or, when None, the one attached to the model or saved beside it (a local directory)."""
    if tokenizer is None:
        tokenizer = attached_tokenizer(model)
    if tokenizer is None:
        src = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not src or not Path(src).is_dir():
            raise ValueError(
                "no tokenizer given and none is saved beside this model: pass tokenizer=... explicitly"
            )
        tokenizer = AutoTokenizer.from_pretrained(src)
    ensure_pad_token(tokenizer)
    return tokenizer


# ------------------------------------------------------------------------------------------------ model state
@contextlib.contextmanager
def no_cudnn_attention() -> Iterator[None]:
    """Scaled-dot-product attention by any backend but cuDNN while gradients are taken (restored on exit).

    cuDNN's bf16/fp16 attention backward returns NaN in the query gradient when an explicit mask is passed
    and the sequence length is 64 mod 128 (pytorch/pytorch#196678, torch 2.11 on H100/H200), and its forward
    gives other values than every other backend on the padding rows of left-padded batches (which the
    "reference" loss convention counts). Measured on an H200 with torch 2.11 (benchmarks/gpu_attention_check.py):
    NaN gradients at length 64, a 79% gradient error at length 96; the organism recipe in bf16 went NaN at
    step 3 with cuDNN and trains with it off. Flash / memory-efficient / math stay enabled, so CPU runs are
    unchanged.
    """
    if sdpa_kernel is None:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), ``requires_grad`` off for every model parameter and no cuDNN attention
    (:func:`no_cudnn_attention`); all restored on exit, also on error. Gradients then flow only to tensors the
    caller creates (trained copies, input embeddings)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        with no_cudnn_attention():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)
