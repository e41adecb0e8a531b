"""Gradients at hook points from one forward and one backward, against `torch.autograd.grad` taken by hand on
tensors read with plain torch hooks on the Hugging Face modules."""

from __future__ import annotations

import contextlib

import pytest
import torch

import neuronmap as nm
from conftest import eager_copy, make_model, output_projection, tokens

LAYER = 1
A, B = 5, 7  # answer tokens of the logit-difference metric


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, A] - logits[:, -1, B]).sum()


def main(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def hf_metric(output) -> torch.Tensor:
    return metric(main(output)) if getattr(output, "logits", None) is not None else main(output)[:, -1].sum()


def block(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    base = model.base_model
    if family == "gpt2":
        return base.h[layer]
    if family in ("bert", "roberta"):
        return base.encoder.layer[layer]
    return base.layers[layer]


@contextlib.contextmanager
def reading(module: torch.nn.Module, *, inputs: bool = False):
    """Keep the module's output (or first input) as it flows, in the graph."""
    seen = {}
    if inputs:
        handle = module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    else:
        handle = module.register_forward_hook(lambda mod, args, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    try:
        yield seen
    finally:
        handle.remove()


def test_residual_stream_gradient_equals_autograd_on_the_blocks_output(hf_model, family):
    hf = hf_model
    with reading(block(hf, family, 0)) as seen:
        reference = torch.autograd.grad(hf_metric(hf(tokens(), use_cache=False)), seen["x"])[0]
    trace = nm.load(hf).run(tokens(), capture_grad="blocks.0.hook_resid_post")
    hf_metric(trace.output).backward()
    assert torch.equal(trace.grad("blocks.0.hook_resid_post"), reference)


def test_per_head_gradient_of_hook_z_equals_autograd_on_the_output_projections_input(hf_model, family):
    hf = hf_model
    projection = output_projection(hf, family, LAYER)
    with reading(projection, inputs=True) as seen:
        reference = torch.autograd.grad(hf_metric(hf(tokens(), use_cache=False)), seen["x"])[0]
    trace = nm.load(hf).run(tokens(), capture_grad=f"blocks.{LAYER}.attn.hook_z")
    hf_metric(trace.output).backward()
    got = trace.grad(f"blocks.{LAYER}.attn.hook_z")
    assert got.shape[-2:] == (hf.config.num_attention_heads, hf.config.hidden_size // hf.config.num_attention_heads)
    torch.testing.assert_close(got.flatten(-2), reference, rtol=0, atol=0)


def test_pattern_gradient_equals_autograd_on_hf_output_attentions():
    hf = make_model("gpt2")
    eager = eager_copy(hf)
    out = eager(tokens(), use_cache=False, output_attentions=True)
    reference = torch.autograd.grad(metric(out.logits), out.attentions[LAYER])[0]
    trace = nm.load(hf).run(tokens(), capture_grad=f"blocks.{LAYER}.attn.hook_pattern")
    metric(trace.logits).backward()
    torch.testing.assert_close(trace.grad(f"blocks.{LAYER}.attn.hook_pattern"), reference, rtol=1e-6, atol=1e-7)


def test_gradients_of_several_points_come_from_one_backward():
    hf = make_model("llama")
    names = ["hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.1.hook_mlp_out"]
    places = [
        (hf.model.embed_tokens, False, None),
        (hf.model.layers[0].self_attn.q_proj, False, hf.config.num_attention_heads),
        (hf.model.layers[0].self_attn.k_proj, False, hf.config.num_key_value_heads),
        (hf.model.layers[1].mlp, False, None),
    ]
    with contextlib.ExitStack() as stack:
        seen = [stack.enter_context(reading(module, inputs=inputs)) for module, inputs, _ in places]
        out = hf(tokens(), use_cache=False)
        references = torch.autograd.grad(metric(out.logits), [s["x"] for s in seen])
    trace = nm.load(hf).run(tokens(), capture_grad=names)
    metric(trace.logits).backward()
    for name, reference, (_, _, heads) in zip(names, references, places):
        expected = reference if heads is None else reference.unflatten(-1, (heads, -1))
        torch.testing.assert_close(trace.grad(name), expected, rtol=0, atol=0, msg=name)
    assert list(trace.grads) and set(trace.grads) == set(names)


def test_captures_stay_in_the_graph_and_their_grad_is_set():
    hf = make_model("gpt2")
    name = "blocks.0.hook_resid_post"
    trace = nm.load(hf).run(tokens(), capture=[name, "blocks.0.attn.hook_z"], capture_grad=[name, "blocks.0.attn.hook_z"])
    assert trace[name].requires_grad
    by_autograd = torch.autograd.grad(metric(trace.logits), trace[name], retain_graph=True)[0]
    metric(trace.logits).backward()
    assert torch.equal(trace[name].grad, by_autograd)
    assert torch.equal(trace["blocks.0.attn.hook_z"].grad, trace.grad("blocks.0.attn.hook_z"))


def test_grad_true_alone_keeps_captures_differentiable():
    hf = make_model("gpt2")
    name = "blocks.1.hook_resid_post"
    with reading(hf.transformer.h[1]) as seen:
        reference = torch.autograd.grad(metric(hf(tokens(), use_cache=False).logits), seen["x"])[0]
    trace = nm.load(hf).run(tokens(), capture=name, grad=True)
    assert torch.equal(torch.autograd.grad(metric(trace.logits), trace[name])[0], reference)


def test_gradients_are_cut_cast_and_moved_like_the_captures():
    hf = make_model("gpt2")
    name = "blocks.0.hook_resid_post"
    full = nm.load(hf).run(tokens(), capture_grad=name)
    metric(full.logits).backward()
    kept = nm.load(hf).run(tokens(), capture=name, capture_grad=name, capture_positions=[-1, 2], capture_dtype=torch.float64)
    metric(kept.logits).backward()
    assert torch.equal(kept.grad(name), full.grad(name)[:, [8, 2]].double())
    assert kept[name].grad is kept.grad(name)


def test_each_backward_pass_replaces_the_gradient_with_its_own():
    hf = make_model("gpt2")
    name = "blocks.0.hook_resid_mid"
    trace = nm.load(hf).run(tokens(), capture_grad=name)
    metric(trace.logits).backward(retain_graph=True)
    first = trace.grad(name).clone()
    (3 * metric(trace.logits)).backward()
    torch.testing.assert_close(trace.grad(name), 3 * first)


def test_the_gradient_at_a_patched_point_is_the_gradient_at_the_patch():
    hf = make_model("gpt2")
    name, position = "blocks.0.hook_resid_post", 3
    patch_value = torch.randn(hf.config.n_embd)

    def patch(resid, hook):
        resid[:, position] = patch_value

    def plain(module, args, output):
        patched = (output[0] if isinstance(output, tuple) else output).clone()
        patched[:, position] = patch_value
        seen["x"] = patched
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    seen = {}
    handle = hf.transformer.h[0].register_forward_hook(plain)
    try:
        reference = torch.autograd.grad(metric(hf(tokens(), use_cache=False).logits), seen["x"])[0]
    finally:
        handle.remove()
    trace = nm.load(hf).run(tokens(), interventions={name: patch}, capture_grad=name)
    metric(trace.logits).backward()
    assert torch.equal(trace.grad(name), reference)


def test_frozen_weights_still_give_gradients_at_hook_points():
    hf = make_model("gpt2").requires_grad_(False)
    name = "blocks.1.hook_attn_out"

    def grab(module, args, output):
        leaf = output[0].detach().requires_grad_() if isinstance(output, tuple) else output.detach().requires_grad_()
        seen["x"] = leaf
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    seen = {}
    handle = hf.transformer.h[1].attn.c_proj.register_forward_hook(grab)
    try:
        with torch.enable_grad():
            reference = torch.autograd.grad(metric(hf(tokens(), use_cache=False).logits), seen["x"])[0]
    finally:
        handle.remove()
    trace = nm.load(hf).run(tokens(), capture_grad=name)
    metric(trace.logits).backward()
    assert torch.equal(trace.grad(name), reference)
    # captured too: the capture is then the leaf autograd fills, and its gradient must not be counted twice
    trace = nm.load(hf).run(tokens(), capture=name, capture_grad=name)
    metric(trace.logits).backward()
    assert torch.equal(trace.grad(name), reference) and torch.equal(trace[name].grad, reference)


def test_asking_for_a_gradient_that_was_not_recorded_says_what_to_do():
    model = nm.load(make_model("gpt2"))
    trace = model.run(tokens(), capture_grad="blocks.0.hook_resid_post")
    with pytest.raises(nm.NotCapturedError, match=r"no gradient has reached 'blocks\.0\.hook_resid_post' yet: call \.backward\(\)"):
        trace.grad("blocks.0.hook_resid_post")
    with pytest.raises(nm.NotCapturedError, match=r"capture_grad='blocks\.1\.hook_resid_post'"):
        trace.grad("blocks.1.hook_resid_post")
    with pytest.raises(nm.HookNameError, match="did you mean"):
        trace.grad("blocks.0.hook_resid_pots")
    assert model.list_hooks() == []


def test_without_capture_grad_nothing_changes_and_the_run_has_no_graph():
    hf = make_model("gpt2")
    model = nm.load(hf)
    plain = model.run(tokens(), capture="blocks.0.hook_resid_post")
    assert not plain.logits.requires_grad and not plain["blocks.0.hook_resid_post"].requires_grad
    watched = model.run(tokens(), capture_grad="blocks.0.attn.hook_z")
    assert torch.equal(watched.logits.detach(), plain.logits)
