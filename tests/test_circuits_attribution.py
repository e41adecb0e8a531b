"""EAP and EAP-IG edge scores against the product computed by hand: each sender's output read from the HF modules
with torch hooks, and each receiver's input gradient taken by adding a zero perturbation to that receiver's input
alone (its own norm recomputed on the perturbed residual stream) and back-propagating the metric."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from neuronmap.circuits.attribution import edge_scores
from neuronmap.circuits.graph import graph
from conftest import make_model, tokens

FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama"]
EDGES = [
    ("embed", "A1.0.q"), ("A0.1", "A1.1.k"), ("MLP 0", "A1.3.q"), ("A0.3", "A1.0.v"), ("A0.2", "MLP 0"),
    ("embed", "MLP 1"), ("A1.1", "logits"), ("MLP 1", "logits"), ("A0.0", "logits"),
]
CORRECT, WRONG = 5, 7


def _metric(logits):
    return logits[:, -1, CORRECT] - logits[:, -1, WRONG]


def _inputs():
    clean = tokens(3, 7, seed=2)
    corrupt = clean.clone()
    corrupt[:, 2] = tokens(3, 1, seed=3)[:, 0]
    corrupt[:, 4] = tokens(3, 1, seed=4)[:, 0]
    return clean, corrupt


def _parts(hf, family, layer):
    """(block, first norm, second norm, attention output projection, MLP) of HF block `layer`."""
    base = hf.base_model
    if family == "gpt2":
        block = base.h[layer]
        return block, block.ln_1, block.ln_2, block.attn.c_proj, block.mlp
    if family.startswith("gpt_neox"):
        block = base.layers[layer]
        return block, block.input_layernorm, block.post_attention_layernorm, block.attention.dense, block.mlp
    block = base.layers[layer]
    return block, block.input_layernorm, block.post_attention_layernorm, block.self_attn.o_proj, block.mlp


def _projection(hf, family, layer, part, head):
    """(module, the output features of head `head`'s `part`, weight as [in, out] columns, bias) by hand."""
    base, d_head = hf.base_model, hf.config.hidden_size // hf.config.num_attention_heads
    if family == "gpt2":
        module = base.h[layer].attn.c_attn
        start = "qkv".index(part) * hf.config.hidden_size + head * d_head
        cols = slice(start, start + d_head)
        return module, cols, module.weight[:, cols], module.bias[cols]
    if family.startswith("gpt_neox"):
        module = base.layers[layer].attention.query_key_value
        start = head * 3 * d_head + "qkv".index(part) * d_head
        cols = slice(start, start + d_head)
        return module, cols, module.weight[cols].T, module.bias[cols]
    module = getattr(base.layers[layer].self_attn, f"{part}_proj")
    cols = slice(head * d_head, (head + 1) * d_head)
    bias = module.bias[cols] if module.bias is not None else 0
    return module, cols, module.weight[cols].T, bias


def _sender_output(hf, family, run_tokens, sender):
    """What `sender` writes into the residual stream on `run_tokens`, read with torch hooks: [batch, pos, d]."""
    seen = {}
    if sender == "embed":
        module, hook = _parts(hf, family, 0)[0], lambda m, args, kwargs: seen.__setitem__("x", _first(args, kwargs))
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    elif sender.startswith("MLP"):
        module = _parts(hf, family, int(sender.split()[1]))[4]
        handle = module.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    else:
        layer, head = map(int, sender[1:].split("."))
        module = _parts(hf, family, layer)[3]
        d_head = hf.config.hidden_size // hf.config.num_attention_heads
        rows = slice(head * d_head, (head + 1) * d_head)
        weight = module.weight if family == "gpt2" else module.weight.T  # [in, out]

        def hook(m, args):
            seen["x"] = args[0][..., rows] @ weight[rows]

        handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            hf(run_tokens, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _receiver_gradient(hf, family, run_tokens, receiver, embed_shift=None, hooks=None):
    """d metric / d (a perturbation added to `receiver`'s input alone), on `run_tokens` (with `embed_shift` added to
    the token embeddings, and the handles `hooks()` registers attached)."""
    n_layers = hf.config.num_hidden_layers
    eps = torch.zeros(*run_tokens.shape, hf.config.hidden_size, requires_grad=True)
    handles = list(hooks()) if hooks else []
    if embed_shift is not None:
        handles.append(hf.get_input_embeddings().register_forward_hook(lambda m, a, out: out + embed_shift))
    if receiver == "logits":
        final = hf.base_model.ln_f if family == "gpt2" else (
            hf.base_model.final_layer_norm if family.startswith("gpt_neox") else hf.base_model.norm)
        handles.append(final.register_forward_pre_hook(lambda m, args: (args[0] + eps,)))
    elif receiver.startswith("MLP"):
        norm = _parts(hf, family, int(receiver.split()[1]))[2]
        handles.append(norm.register_forward_hook(lambda m, args, out: type(m).forward(m, args[0] + eps)))
    else:
        node, part = receiver.rsplit(".", 1)
        layer, head = map(int, node[1:].split("."))
        block, ln1 = _parts(hf, family, layer)[:2]
        module, cols, weight, bias = _projection(hf, family, layer, part, head)
        seen = {}
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("x", _first(args, kwargs)), with_kwargs=True))

        def replace(m, args, out):
            out = out.clone()
            out[..., cols] = type(ln1).forward(ln1, seen["x"] + eps) @ weight + bias
            return out

        handles.append(module.register_forward_hook(replace))
    assert n_layers == 2
    try:
        _metric(hf(run_tokens, use_cache=False).logits).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    return eps.grad


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_scores_equal_the_product_of_sender_differences_and_receiver_gradients_by_hand(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    g, scores, clean_value, corrupt_value = edge_scores(model, clean, corrupt, _metric)
    with torch.no_grad():
        assert clean_value == pytest.approx(_metric(hf(clean, use_cache=False).logits).mean().item(), abs=1e-5)
        assert corrupt_value == pytest.approx(_metric(hf(corrupt, use_cache=False).logits).mean().item(), abs=1e-5)
    for sender, receiver in EDGES:
        got = scores[g.sender(sender), g.receiver(receiver)]
        if family == "gpt_neox" and (sender, receiver) == ("A0.2", "MLP 0"):  # parallel: the MLP reads the block's input
            assert not g.valid[g.sender(sender), g.receiver(receiver)] and got == 0
            continue
        delta = _sender_output(hf, family, clean, sender) - _sender_output(hf, family, corrupt, sender)
        expected = (delta * _receiver_gradient(hf, family, corrupt, receiver)).sum()
        assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5), (sender, receiver)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eap_ig_averages_the_receiver_gradients_over_embeddings_moving_from_corrupted_to_clean(family):
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    steps = 3
    g, scores, *_ = edge_scores(model, clean, corrupt, _metric, steps=steps)
    embed = hf.get_input_embeddings()
    with torch.no_grad():
        shift = embed(clean) - embed(corrupt)
    for sender, receiver in EDGES[:5]:
        delta = _sender_output(hf, family, clean, sender) - _sender_output(hf, family, corrupt, sender)
        gradient = sum(_receiver_gradient(hf, family, corrupt, receiver, k / steps * shift) for k in range(steps)) / steps
        got = scores[g.sender(sender), g.receiver(receiver)]
        assert got.item() == pytest.approx((delta * gradient).sum().item(), rel=1e-4, abs=1e-5), (sender, receiver)


def test_eap_ig_with_one_step_is_eap_and_non_edges_score_zero():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _inputs()
    _, eap, *_ = edge_scores(model, clean, corrupt, _metric)
    g, one_step, *_ = edge_scores(model, clean, corrupt, _metric, steps=1)
    assert torch.equal(eap, one_step)
    assert (eap[~g.valid] == 0).all() and (eap[g.valid] != 0).float().mean() > 0.9


def test_per_position_scores_sum_to_the_merged_ones():
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _inputs()
    _, merged, *_ = edge_scores(model, clean, corrupt, _metric)
    g, per_position, *_ = edge_scores(model, clean, corrupt, _metric, graph(model, positions=clean.shape[1]))
    assert per_position.shape == (clean.shape[1], *merged.shape)
    assert torch.allclose(per_position.sum(0), merged, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_a_last_position_metric_gives_the_same_scores_with_the_last_logits_only(steps):
    """A metric of the last position lets the runs compute the last position's logits only: same scores."""
    model = nm.load(make_model("llama"))
    clean, corrupt = _inputs()
    _, full, clean_value, corrupt_value = edge_scores(model, clean, corrupt, _metric, steps=steps)
    _, trimmed, *values = edge_scores(model, clean, corrupt, nm.patching.logit_diff(CORRECT, WRONG), steps=steps)
    assert torch.allclose(trimmed, full, atol=1e-5) and values == pytest.approx([clean_value, corrupt_value], abs=1e-5)


def _group_output(hf, family, run_tokens, sender):
    """What the layer part `sender` belongs to writes, read with torch hooks: the block input (embeddings), the
    attention output projection's input (every head's z) or the MLP's output."""
    seen = {}
    if sender == "embed":
        handle = _parts(hf, family, 0)[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("x", _first(args, kwargs)), with_kwargs=True)
    elif sender.startswith("MLP"):
        handle = _parts(hf, family, int(sender.split()[1]))[4].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    else:
        handle = _parts(hf, family, int(sender[1:].split(".")[0]))[3].register_forward_pre_hook(
            lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            hf(run_tokens, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def _interpolating(hf, family, sender, start, end, alpha):
    """Hooks setting the output of `sender`'s layer part to start + alpha (end - start): a function registering them."""
    value = start + alpha * (end - start)

    def register():
        if sender == "embed":
            def embed(m, args, kwargs):
                return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})

            return [_parts(hf, family, 0)[0].register_forward_pre_hook(embed, with_kwargs=True)]
        if sender.startswith("MLP"):
            return [_parts(hf, family, int(sender.split()[1]))[4].register_forward_hook(lambda m, a, out: value)]
        return [_parts(hf, family, int(sender[1:].split(".")[0]))[3].register_forward_pre_hook(lambda m, args: (value,))]

    return register


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_eap_ig_on_activations_averages_each_edges_gradient_over_its_senders_layer_moving_to_clean(family):
    """The Riemann sum by hand: for edge u -> v, the gradient at v's input on the corrupted run with the outputs of
    u's layer part (the embeddings, a layer's heads, a layer's MLP) set to corrupted + k/steps (clean - corrupted)."""
    hf = make_model(family)
    model = nm.load(hf)
    clean, corrupt = _inputs()
    steps = 3
    g, scores, _, corrupt_value = edge_scores(model, clean, corrupt, _metric, steps=steps, ig="activations")
    with torch.no_grad():
        assert corrupt_value == pytest.approx(_metric(hf(corrupt, use_cache=False).logits).mean().item(), abs=1e-5)
    for sender, receiver in EDGES:
        if not g.valid[g.sender(sender), g.receiver(receiver)]:
            continue
        start, end = _group_output(hf, family, corrupt, sender), _group_output(hf, family, clean, sender)
        gradient = sum(
            _receiver_gradient(hf, family, corrupt, receiver, hooks=_interpolating(hf, family, sender, start, end, k / steps))
            for k in range(steps)) / steps
        delta = _sender_output(hf, family, clean, sender) - _sender_output(hf, family, corrupt, sender)
        got = scores[g.sender(sender), g.receiver(receiver)]
        assert got.item() == pytest.approx((delta * gradient).sum().item(), rel=1e-4, abs=1e-5), (sender, receiver)
    _, on_inputs, *_ = edge_scores(model, clean, corrupt, _metric, steps=steps)
    embed = g.sender("embed")
    assert torch.allclose(scores[embed], on_inputs[embed], atol=1e-5)  # moving the embeddings is moving the inputs
    assert not torch.allclose(scores, on_inputs, atol=1e-3)


def test_eap_ig_on_activations_with_one_step_is_eap():
    model = nm.load(make_model("llama"))
    clean, corrupt = _inputs()
    _, eap, *values = edge_scores(model, clean, corrupt, _metric)
    _, one_step, *one_values = edge_scores(model, clean, corrupt, _metric, steps=1, ig="activations")
    assert torch.allclose(eap, one_step, atol=1e-6) and values == one_values
    with pytest.raises(nm.InputError, match="ig must be one of"):
        edge_scores(model, clean, corrupt, _metric, steps=2, ig="outputs")


@pytest.mark.parametrize("ig", ["inputs", "activations"])
@pytest.mark.parametrize("metric", [_metric, nm.patching.logit_diff(CORRECT, WRONG)], ids=["function", "logit_diff"])
def test_eap_ig_in_small_memory_budgets_gives_the_same_scores(ig, metric):
    """A budget of 1 byte runs one row per pass (one whole run of the prompts for a function of the logits, which
    sees whole runs): the gradients of the chunks add up to the stacked ones."""
    model = nm.load(make_model("gpt2"))
    clean, corrupt = _inputs()
    _, stacked, *values = edge_scores(model, clean, corrupt, metric, steps=3, ig=ig)
    _, chunked, *chunked_values = edge_scores(model, clean, corrupt, metric, steps=3, ig=ig, memory_budget=1)
    assert torch.allclose(chunked, stacked, atol=1e-6, rtol=0) and chunked_values == pytest.approx(values, abs=1e-6)
    with pytest.raises(nm.InputError, match="memory_budget must be a number of bytes"):
        edge_scores(model, clean, corrupt, metric, memory_budget=0)


class _TanhNorm(torch.nn.Module):
    """A norm of neither closed form: LayerNorm plus a squashed copy of its input."""

    def __init__(self, width):
        super().__init__()
        self.inner = torch.nn.LayerNorm(width)

    def forward(self, x):
        return self.inner(x) + x.tanh()


@pytest.mark.parametrize("kind", ["layer", "rms", "other"])
def test_receiver_gradients_through_a_norm_equal_autograds(kind):
    """Each receiver reads norm(x) @ W_r: its gradient at x, by the closed form (LayerNorm, RMSNorm) or by the norm
    module's vjp (any other), against torch.autograd.grad receiver by receiver."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from neuronmap.circuits.attribution import _norm_form, _through_norm

    torch.manual_seed(0)
    width = 16
    norm = {"layer": torch.nn.LayerNorm(width), "rms": LlamaRMSNorm(width, eps=1e-5), "other": _TanhNorm(width)}[kind]
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.copy_(torch.randn_like(parameter))
    x, weights, gradients = torch.randn(2, 3, width) * 3 + 1, torch.randn(4, width, 5), torch.randn(2, 3, 4, 5)
    assert (_norm_form(norm, x) is None) == (kind == "other")
    got, direct = _through_norm(norm, x, gradients, weights), _through_norm(norm, x, gradients[:, :, :1] @ weights[0].T)
    for r in range(4):
        leaf = x.clone().requires_grad_()
        expected, = torch.autograd.grad(norm(leaf) @ weights[r], leaf, gradients[:, :, r])
        assert torch.allclose(got[r], expected, atol=1e-5, rtol=1e-4), r
        if r == 0:  # the gradient given at the norm's output itself (as for an MLP)
            assert torch.allclose(direct[0], expected, atol=1e-5, rtol=1e-4)
