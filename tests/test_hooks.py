"""hooks: recording, stopping, editing and re-running decoder blocks; every hook is removed on exit and on errors."""
from __future__ import annotations

import pytest
import torch

from rmu_analysis import hooks, steer
from rmu_analysis.models import decoder_blocks

PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B", "Question: which host does the pathogen infect?"]


def hooks_left(model):
    """Hooks on the blocks (transformers 5 installs its own output-capturing hooks on the first forward pass)."""
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in decoder_blocks(model))


def inputs(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def reference(model, tokenizer):
    with torch.no_grad():
        return model(**inputs(tokenizer), output_hidden_states=True).hidden_states


def test_record_context_manager_equals_hidden_states(tiny_llama, tiny_tokenizer):
    ref = reference(tiny_llama, tiny_tokenizer)
    before = hooks_left(tiny_llama)
    with hooks.record(tiny_llama, [1, -1]) as rec, torch.no_grad():
        tiny_llama(**inputs(tiny_tokenizer))
    assert sorted(rec.outputs) == [1, 3] and hooks_left(tiny_llama) == before
    torch.testing.assert_close(rec.outputs[1], ref[2])
    assert not rec.outputs[1].requires_grad


def test_forward_stops_after_and_before_a_block(tiny_llama, tiny_tokenizer):
    reference(tiny_llama, tiny_tokenizer)
    before = hooks_left(tiny_llama)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(decoder_blocks(tiny_llama))]
    try:
        with torch.no_grad():
            rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), [0, 1], stop_after=1)
        assert ran == [0, 1] and sorted(rec.outputs) == [0, 1]
        ran.clear()
        with torch.no_grad():
            rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), calls=[2], stop_before=2)
        assert ran == [0, 1] and list(rec.calls) == [2] and rec.outputs == {}
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(rec.calls[2].hidden, reference(tiny_llama, tiny_tokenizer)[2])
    assert "position_embeddings" in rec.calls[2].kwargs and hooks_left(tiny_llama) == before


def test_hooks_are_removed_on_error(tiny_llama, tiny_tokenizer):
    reference(tiny_llama, tiny_tokenizer)
    before = hooks_left(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.record(tiny_llama, "all", calls="all"):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.edit(tiny_llama, 1, lambda h: h):
            raise RuntimeError("boom")
    assert hooks_left(tiny_llama) == before and not hooks._EDITS


def test_run_blocks_continues_the_forward_pass(tiny_llama, tiny_tokenizer):
    ref = reference(tiny_llama, tiny_tokenizer)
    with torch.no_grad():
        rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), calls=[1, 2], stop_before=3)
        outs = hooks.run_blocks(tiny_llama, rec.calls[1].hidden, rec.calls, [1, 2])
    assert sorted(outs) == [1, 2]
    torch.testing.assert_close(outs[2], ref[3], rtol=0, atol=1e-6)
    # swapping a tensor in: zero down-projection of block 2 = block 2 adds only its attention output
    zero = {2: {"mlp.down_proj.weight": torch.zeros_like(decoder_blocks(tiny_llama)[2].mlp.down_proj.weight)}}
    with torch.no_grad():
        swapped = hooks.run_blocks(tiny_llama, rec.calls[1].hidden, rec.calls, [1, 2], overrides=zero)
    torch.testing.assert_close(swapped[1], outs[1], rtol=0, atol=0)
    assert not torch.allclose(swapped[2], outs[2])
    assert float(decoder_blocks(tiny_llama)[2].mlp.down_proj.weight.detach().abs().sum()) > 0  # model not written


def test_calls_made_with_hidden_states_as_keyword_are_recorded_alike(tiny_llama, tiny_tokenizer):
    with torch.no_grad():
        rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), calls=[1], stop_before=2)
        call = rec.calls[1]
        block = decoder_blocks(tiny_llama)[1]
        with hooks.record(tiny_llama, calls=[1]) as again:
            block(hidden_states=call.hidden, *call.args, **call.kwargs)
    assert torch.equal(again.calls[1].hidden, call.hidden) and again.calls[1].args == ()
    assert set(again.calls[1].kwargs) == set(call.kwargs)


def test_nested_edits_innermost_wins(tiny_llama, tiny_tokenizer):
    reference(tiny_llama, tiny_tokenizer)
    before = hooks_left(tiny_llama)
    d = tiny_llama.config.hidden_size
    outer, inner = torch.full((d,), 2.0), torch.full((d,), -3.0)
    with steer(tiny_llama, 1, outer):
        with steer(tiny_llama, 1, inner), torch.no_grad():
            rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), [1], stop_after=1)
        assert torch.equal(rec.outputs[1], inner.expand_as(rec.outputs[1]))
        with torch.no_grad():
            rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), [1], stop_after=1)
        assert torch.equal(rec.outputs[1], outer.expand_as(rec.outputs[1]))
    # add mode nests as a sum; both contexts gone afterwards
    with steer(tiny_llama, 1, outer, mode="add"), steer(tiny_llama, 1, inner, mode="add"), torch.no_grad():
        rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), [1], stop_after=1)
    base = reference(tiny_llama, tiny_tokenizer)[2]
    torch.testing.assert_close(rec.outputs[1], base + (outer + inner), rtol=0, atol=1e-5)
    assert hooks_left(tiny_llama) == before and not hooks._EDITS


@pytest.mark.parametrize("as_keyword", [False, True])
def test_edit_input_changes_what_a_block_is_called_with(tiny_llama, tiny_tokenizer, as_keyword):
    """A shifted input of block 1 gives the outputs run_blocks gives on the shifted input, whether the block is
    called with its hidden states by position or by keyword; the hook is gone after the context, on an error too."""
    reference(tiny_llama, tiny_tokenizer)
    before = hooks_left(tiny_llama)
    block = decoder_blocks(tiny_llama)[1]
    with torch.no_grad():
        rec = hooks.forward(tiny_llama, inputs(tiny_tokenizer), calls=[1, 2], stop_before=3)
        call = rec.calls[1]
        shifted = hooks.run_blocks(tiny_llama, call.hidden + 0.5, rec.calls, [1, 2])
        with hooks.edit_input(tiny_llama, 1, lambda h: h + 0.5):
            if as_keyword:
                got, expected = hooks.block_output(block(hidden_states=call.hidden, *call.args, **call.kwargs)), shifted[1]
            else:
                got, expected = hooks.forward(tiny_llama, inputs(tiny_tokenizer), [2], stop_after=2).outputs[2], shifted[2]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert hooks_left(tiny_llama) == before
        with pytest.raises(RuntimeError, match="inside"), hooks.edit_input(tiny_llama, 1, lambda h: h):
            raise RuntimeError("an error inside the block")
    assert hooks_left(tiny_llama) == before
