"""activations: block outputs in one early-stopped pass, equal to output_hidden_states, with mask-aware means and
per-token norms."""
from __future__ import annotations

import copy

import pytest
import torch

import rmu_analysis
from rmu_analysis.activations import Capture, capture, capture_batches, mean_token_norm, token_norms
from rmu_analysis.models import decoder_blocks
from rmu_analysis import testing

PROMPTS = [
    "The city of Varon lies on the river Elm.",
    "Question: which host does the pathogen infect?",
    "Answer: B",
]


def count_block_calls(model):
    counts = [0] * len(decoder_blocks(model))
    handles = [b.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, b in enumerate(decoder_blocks(model))]
    return counts, handles


def hooks_left(model):
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in decoder_blocks(model))


@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_equals_output_hidden_states(tiny_llama, tiny_tokenizer, side):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.padding_side = side
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = tiny_llama(**enc, position_ids=pos, output_hidden_states=True).hidden_states
    cap = capture(tiny_llama, enc, layers="all")
    assert cap.layers == [0, 1, 2, 3]
    real = mask.bool()
    for l in range(3):
        torch.testing.assert_close(cap.hidden[l][real], ref[l + 1][real], rtol=0, atol=1e-6)
    # HF applies the final norm to the last hidden_states entry; capture keeps the raw block output
    normed = tiny_llama.model.norm(cap.hidden[3])
    torch.testing.assert_close(normed[real], ref[4][real], rtol=0, atol=1e-5)


def test_strings_and_tensor_inputs_agree(tiny_llama, tiny_tokenizer):
    cap = capture(tiny_llama, PROMPTS, layers=[1, 2])
    enc = tiny_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert torch.equal(cap.input_ids, enc["input_ids"])
    from_dict = capture(tiny_llama, dict(enc), layers=[1, 2])
    torch.testing.assert_close(from_dict.mean(2), cap.mean(2))
    single = tiny_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    from_ids = capture(tiny_llama, single, layers=2)
    torch.testing.assert_close(from_ids.mean(2)[0], cap.mean(2)[0], rtol=0, atol=1e-5)


def test_stops_after_deepest_block_and_removes_hooks(tiny_llama):
    counts, handles = count_block_calls(tiny_llama)
    head_calls = []
    h_head = tiny_llama.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        capture(tiny_llama, PROMPTS, layers=[0, 1])
    finally:
        for h in handles + [h_head]:
            h.remove()
    assert counts == [1, 1, 0, 0]
    assert head_calls == []
    assert hooks_left(tiny_llama) == 0


def test_hooks_removed_on_error(tiny_llama):
    with pytest.raises(ValueError):
        capture(tiny_llama, torch.tensor([[0, 5, 10_000]]), layers=[1])  # id outside the vocabulary
    assert hooks_left(tiny_llama) == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_means_are_padding_invariant_and_exclude_bos(tiny_llama, side):
    batched = capture(tiny_llama, PROMPTS, layers=[2], padding_side=side)
    no_bos = capture(tiny_llama, PROMPTS, layers=[2], padding_side=side, exclude_bos=True)
    for i, p in enumerate(PROMPTS):
        alone = capture(tiny_llama, [p], layers=[2])
        torch.testing.assert_close(batched.mean(2)[i], alone.mean(2)[0], rtol=0, atol=1e-5)
        h = alone.hidden[2][0]
        torch.testing.assert_close(no_bos.mean(2)[i], h[1:].mean(0), rtol=0, atol=1e-5)
    assert (batched.token_mask.sum(-1) - no_bos.token_mask.sum(-1)).tolist() == [1, 1, 1]
    frame = batched.to_frame()
    assert list(frame.columns) == ["layer", "prompt", "n_tokens", "mean_norm", "token_norm"]
    assert len(frame) == len(PROMPTS)


def test_public_import_is_callable(tiny_llama):
    from rmu_analysis import capture as exported

    cap = exported(tiny_llama, PROMPTS[:1], layers=-1)
    assert isinstance(cap, Capture) and cap.layers == [3]
    assert isinstance(rmu_analysis.capture(tiny_llama, PROMPTS[:1], layers=0), Capture)


def test_bad_inputs(tiny_llama, tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        capture(tiny_llama, [], layers=0)
    with pytest.raises(ValueError, match=r"out of range: this model has 4 decoder blocks \(0–3\)"):
        capture(tiny_llama, PROMPTS, layers=[1, 4])
    with pytest.raises(TypeError, match="strings"):
        capture(tiny_llama, ["ok", 3], layers=0)
    with pytest.raises(ValueError, match="no attended tokens"):
        capture(tiny_llama, {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[0, 0]])}, 0)
    with pytest.raises(KeyError, match="not captured"):
        capture(tiny_llama, PROMPTS, layers=[0]).mean(1)


def test_long_prompt_is_truncated_with_warning(tiny_llama):
    long = " ".join(["Varon"] * 400)
    with pytest.warns(UserWarning, match="truncated"):
        cap = capture(tiny_llama, [long, "Answer: A"], layers=[0])
    assert cap.input_ids.shape[1] == 256  # max_position_embeddings of the tiny model


def test_tokenizer_without_pad_token_uses_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    model = testing.tiny_llama(len(tok))
    with pytest.warns(UserWarning, match="no pad token"):
        cap = capture(model, PROMPTS, layers=[0], tokenizer=tok)
    assert tok.pad_token == tok.eos_token
    assert cap.hidden[0].shape[0] == 3


def test_works_on_gpt2(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=3,
                                       n_head=4)).eval()
    enc = tiny_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc, output_hidden_states=True).hidden_states
    cap = capture(model, enc, layers=[0, 1])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(cap.hidden[1][real], ref[2][real], rtol=0, atol=1e-5)


def test_capture_batches_equal_one_capture_per_chunk(tiny_llama):
    prompts = PROMPTS * 3
    chunks = list(capture_batches(tiny_llama, prompts, [1, 2], batch_size=4, exclude_bos=True))
    assert [list(r) for r, _ in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    for rows, cap in chunks:
        one = capture(tiny_llama, prompts[rows.start:rows.stop], layers=[1, 2], exclude_bos=True)
        torch.testing.assert_close(cap.tokens(2), one.tokens(2), rtol=0, atol=0)


def test_token_norms_and_mean_token_norm(tiny_llama):
    cap = capture(tiny_llama, PROMPTS, layers=[1, 3], exclude_bos=True)
    norms = token_norms(tiny_llama, PROMPTS, [1, 3], exclude_bos=True, batch_size=2)
    for l in (1, 3):
        expected = cap.hidden[l][cap.token_mask].float().norm(dim=-1)
        assert norms[l].dtype.name == "float64" and norms[l].shape == expected.shape
        torch.testing.assert_close(torch.as_tensor(norms[l]).float(), expected, rtol=1e-5, atol=1e-5)
        whole = mean_token_norm(cap.hidden[l], cap.token_mask)
        assert float(whole) == pytest.approx(float(expected.mean()), rel=1e-5)
        per_prompt = mean_token_norm(cap.hidden[l], cap.token_mask, per_sample=True)
        frame = cap.to_frame().query("layer == @l")
        assert per_prompt.tolist() == pytest.approx(frame["token_norm"].tolist(), rel=1e-6)
    # no mask: every position counts
    h = cap.hidden[1]
    assert float(mean_token_norm(h)) == pytest.approx(float(h.float().norm(dim=-1).mean()), rel=1e-6)
