"""Path patching against the same two steps written here with plain torch hooks on GPT-2's modules, and on `ioi`."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.zoo.recipes import ioi
from test_patching import CLEAN, CORRECT, CORRUPT, WRONG, load, logit_diff_by_hand

N_HEADS, D_HEAD, D_MODEL = 4, 8, 32


def _record(hf, batch):
    """Every layer's per-head input of the output projection and MLP output in one run of `batch`."""
    seen = {}
    handles = []
    for layer, block in enumerate(hf.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a, l=layer: seen.__setitem__(("z", l), a[0].clone())))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__(("mlp", l), o.clone())))
    with torch.no_grad():
        hf(input_ids=batch.tokens, attention_mask=batch.attention_mask)
    for handle in handles:
        handle.remove()
    return seen


def _sent(hf, batch, target, source, sender, receiver=None):
    """Run `batch` with every head and MLP frozen to `target` but the sender's head from `source`; the logits and
    (with a receiver head) that head's query there."""
    layer_s, head_s = sender
    handles, seen = [], {}
    for layer, block in enumerate(hf.transformer.h):
        def freeze_z(m, a, layer=layer):
            z = target[("z", layer)].clone()
            if layer == layer_s:
                z[..., head_s * D_HEAD : (head_s + 1) * D_HEAD] = source[("z", layer)][..., head_s * D_HEAD : (head_s + 1) * D_HEAD]
            return (z,)

        handles.append(block.attn.c_proj.register_forward_pre_hook(freeze_z))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, layer=layer: target[("mlp", layer)]))
    if receiver is not None:
        handles.append(hf.transformer.h[receiver[0]].attn.c_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("qkv", o.clone())))
    with torch.no_grad():
        logits = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    for handle in handles:
        handle.remove()
    return logits, seen.get("qkv")


def test_path_patching_to_the_logits_equals_freezing_every_other_head_and_mlp_by_hand():
    model = load("gpt2")
    hf, clean, corrupt = model.module, model._batch(CLEAN), model._batch(CORRUPT)
    target, source = _record(hf, clean), _record(hf, corrupt)
    expected = torch.empty(2, N_HEADS)
    for layer in range(2):
        for head in range(N_HEADS):
            logits, _ = _sent(hf, clean, target, source, (layer, head))
            expected[layer, head] = logit_diff_by_hand(logits, clean.last_positions)
    result = nm.patching.path_patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG))
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)


def test_path_patching_to_a_heads_query_takes_only_that_query_from_the_frozen_run():
    model = load("gpt2")
    hf, clean, corrupt = model.module, model._batch(CLEAN), model._batch(CORRUPT)
    target, source = _record(hf, clean), _record(hf, corrupt)
    receiver = (1, 3)
    expected = torch.empty(2, N_HEADS)
    query = slice(receiver[1] * D_HEAD, (receiver[1] + 1) * D_HEAD)
    for layer in range(2):
        for head in range(N_HEADS):
            _, qkv = _sent(hf, clean, target, source, (layer, head), receiver)

            def take_query(m, a, o, qkv=qkv):
                o = o.clone()
                o[..., query] = qkv[..., query]
                return o

            handle = hf.transformer.h[receiver[0]].attn.c_attn.register_forward_hook(take_query)
            with torch.no_grad():
                logits = hf(input_ids=clean.tokens, attention_mask=clean.attention_mask).logits
            handle.remove()
            expected[layer, head] = logit_diff_by_hand(logits, clean.last_positions)
    result = nm.patching.path_patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), receivers=[(*receiver, "q")])
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)
    assert torch.allclose(result.raw[1], torch.tensor(result.clean))  # a head in the receiver's own layer sends nothing


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(receivers=[(1, 4, "q")]), r"receiver head 4 is out of range"),
        (dict(receivers=[(2, 0, "q")]), r"receiver layer 2 is out of range"),
        (dict(receivers=[(1, 0, "z")]), r"a receiver is \(layer, head, 'q' \| 'k' \| 'v'\)"),
        (dict(senders="neurons"), r"senders must be one of"),
    ],
)
def test_bad_path_patching_input_is_a_clear_error(kwargs, message):
    model = load("gpt2")
    with pytest.raises(nm.NeuronMapError, match=message):
        nm.patching.path_patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), **kwargs)
    assert model.list_hooks() == []


def test_on_ioi_the_head_whose_direct_path_to_the_logits_carries_the_logit_difference_is_the_cards():
    model = nm.load("ioi")
    prompts = ioi.heldout_prompts(16)

    metric = nm.patching.logit_diff([" " + p["io"] for p in prompts], [" " + p["s"] for p in prompts])
    result = nm.patching.path_patch(model, [p["prompt"] for p in prompts], [ioi.flipped(p) for p in prompts], metric)
    assert result.top(1)[0][0] == ("1", "2")  # L1H2: "its direct contribution to the logit difference is +7.23"
    assert result.values[1, 2] < 0.3 and (result.values.flatten()[[0, 1, 2, 3, 4, 5, 7]] - 1).abs().max() < 0.05
