"""Exact edge patching against a hand-written run on the HF modules that rebuilds each receiver's input from the
senders' outputs in that same run: receiver input = residual stream - sum over cut edges of (current - corrupted
sender output), the receiver's own norm and weight slices applied by hand."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits import graph
from neuronmap.circuits.exact import circuit_metrics
from conftest import make_model, tokens
from test_circuits_attribution import _first, _parts, _projection, _sender_output

FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama"]
CUTS = {
    "layer 1 and the logits": [
        ("embed", "A1.0.k"), ("A0.2", "A1.1.v"), ("A0.0", "MLP 1"), ("MLP 0", "logits"), ("A0.1", "A1.1.q"),
        ("A0.1", "A1.2.q"),
    ],
    "chained through layer 0": [
        ("embed", "MLP 0"), ("MLP 0", "logits"), ("embed", "A0.1.q"), ("A0.1", "A1.0.v"), ("A1.0", "logits"),
        ("embed", "A1.1.k"), ("A1.3", "MLP 1"),
    ],
}


def _metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 7]


def _inputs():
    clean = tokens(3, 7, seed=2)
    corrupt = clean.clone()
    corrupt[:, 2] = tokens(3, 1, seed=3)[:, 0]
    corrupt[:, 5] = tokens(3, 1, seed=4)[:, 0]
    return clean, corrupt


def _hand_run(hf, family, clean, corrupt, cuts, corrupted=None):
    """The metric per prompt of the clean run in which each cut edge carries its sender's corrupted output (read
    from the run of `corrupt`, unless given as `corrupted`: {sender: output})."""
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    corrupted = corrupted or {sender: _sender_output(hf, family, corrupt, sender) for sender, _ in cuts}
    current, handles = {}, []

    def shift(receiver):
        return sum(current[s] - corrupted[s] for s, r in cuts if r == receiver)

    for sender in {s for s, _ in cuts}:  # the senders' outputs in this run, as it goes
        if sender == "embed":
            handles.append(_parts(hf, family, 0)[0].register_forward_pre_hook(
                lambda m, args, kwargs: current.__setitem__("embed", _first(args, kwargs)), with_kwargs=True))
        elif sender.startswith("MLP"):
            handles.append(_parts(hf, family, int(sender.split()[1]))[4].register_forward_hook(
                lambda m, a, out, sender=sender: current.__setitem__(sender, out)))
        else:
            layer, head = map(int, sender[1:].split("."))
            projection = _parts(hf, family, layer)[3]
            weight = projection.weight if family == "gpt2" else projection.weight.T
            rows = slice(head * d_head, (head + 1) * d_head)
            handles.append(projection.register_forward_pre_hook(
                lambda m, args, sender=sender, rows=rows, weight=weight: current.__setitem__(sender, args[0][..., rows] @ weight[rows])))
    blocks_seen = {}
    for receiver in {r for _, r in cuts}:  # each receiver's input rebuilt
        if receiver == "logits":
            final = hf.base_model.ln_f if family == "gpt2" else (
                hf.base_model.final_layer_norm if family.startswith("gpt_neox") else hf.base_model.norm)
            handles.append(final.register_forward_pre_hook(lambda m, args: (args[0] - shift("logits"),)))
        elif receiver.startswith("MLP"):
            norm = _parts(hf, family, int(receiver.split()[1]))[2]
            handles.append(norm.register_forward_hook(
                lambda m, args, out, receiver=receiver: type(m).forward(m, args[0] - shift(receiver))))
        else:
            node, part = receiver.rsplit(".", 1)
            layer, head = map(int, node[1:].split("."))
            block, ln1 = _parts(hf, family, layer)[:2]
            if layer not in blocks_seen:
                blocks_seen[layer] = {}
                handles.append(block.register_forward_pre_hook(
                    lambda m, args, kwargs, seen=blocks_seen[layer]: seen.__setitem__("x", _first(args, kwargs)), with_kwargs=True))
            module, cols, weight, bias = _projection(hf, family, layer, part, head)

            def rebuild(m, args, out, receiver=receiver, seen=blocks_seen[layer], cols=cols, weight=weight, bias=bias, ln1=ln1):
                out = out.clone()
                out[..., cols] = type(ln1).forward(ln1, seen["x"] - shift(receiver)) @ weight + bias
                return out

            handles.append(module.register_forward_hook(rebuild))
    try:
        with torch.no_grad():
            return _metric(hf(clean, use_cache=False).logits)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_circuits_with_cut_edges_equal_a_hand_written_run_rebuilding_each_receivers_input(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    g = graph(model)
    masks = []
    for cuts in CUTS.values():
        mask = g.valid.clone()
        for sender, receiver in cuts:
            if g.valid[g.sender(sender), g.receiver(receiver)]:
                mask[g.sender(sender), g.receiver(receiver)] = False
        masks.append(mask)
    values, *_ = circuit_metrics(model, clean, corrupt, _metric, g, torch.stack(masks))
    for row, cuts in zip(values, CUTS.values()):
        kept = [(s, r) for s, r in cuts if g.valid[g.sender(s), g.receiver(r)]]
        expected = _hand_run(hf, family, clean, corrupt, kept)
        assert torch.allclose(row, expected, atol=1e-4), (row, expected)
        with torch.no_grad():
            assert not torch.allclose(row, _metric(hf(clean).logits), atol=1e-3)  # the cuts do change the run
    assert model.list_hooks() == []


@pytest.mark.parametrize("family", FAMILIES)
def test_the_full_circuit_is_the_clean_run_and_the_empty_one_the_corrupted_run_exactly(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    g = graph(model)
    values, clean_value, corrupt_value = circuit_metrics(
        model, clean, corrupt, _metric, g, torch.stack([g.valid, torch.zeros_like(g.valid)]))
    with torch.no_grad():
        assert torch.equal(values[0], _metric(hf(clean).logits))
        assert torch.equal(values[1], _metric(hf(corrupt).logits))
    assert clean_value == pytest.approx(float(values[0].mean())) and corrupt_value == pytest.approx(float(values[1].mean()))


def test_circuits_in_small_memory_budgets_give_the_same_values():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _inputs()
    g = graph(model)
    masks = torch.rand(5, *g.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    together, *_ = circuit_metrics(model, clean, corrupt, _metric, g, masks)
    one_by_one, *_ = circuit_metrics(model, clean, corrupt, _metric, g, masks, memory_budget=1)
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_a_last_position_metric_gives_the_same_circuit_values_with_the_last_logits_only():
    model = nm.load(make_model("gpt_neox"))
    clean, corrupt = _inputs()
    g = graph(model)
    masks = torch.rand(3, *g.valid.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    full, *full_values = circuit_metrics(model, clean, corrupt, _metric, g, masks)
    trimmed, *trimmed_values = circuit_metrics(model, clean, corrupt, nm.patching.logit_diff(5, 7), g, masks)
    assert torch.allclose(trimmed, full, atol=1e-5) and trimmed_values == pytest.approx(full_values, abs=1e-5)
