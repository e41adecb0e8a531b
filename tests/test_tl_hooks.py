"""The TransformerLens hook points a user reaches for beyond the residual stream: `hook_pos_embed` per prompt,
`attn.hook_result`, and each norm's `hook_scale` and `hook_normalized`, against the HF modules read with plain
torch hooks and hand-made edits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import neuronmap as nm
from neuronmap.hooks import is_neuronmap_hook
from conftest import ENCODERS, bare, main_output, make_model, output_projection, tokens

N_LAYERS = 2
LEARNED_POSITIONS = ["gpt2", "bert", "roberta"]
NEW_SUFFIXES = ("ln1.hook_scale", "ln1.hook_normalized", "attn.hook_result", "ln2.hook_scale", "ln2.hook_normalized")


# --- the HF modules, found by hand ------------------------------------------------------------------------------


def position_embedding(model: torch.nn.Module) -> torch.nn.Module:
    base = model.base_model
    return base.wpe if hasattr(base, "wpe") else base.embeddings.position_embeddings


def norm_module(model: torch.nn.Module, family: str, name: str) -> torch.nn.Module:
    """The HF module behind `blocks.L.ln1` / `blocks.L.ln2` / `ln_final` (BERT: the LayerNorms after attention and MLP)."""
    base = model.base_model
    if name == "ln_final":
        if family == "gpt2":
            return base.ln_f
        return base.final_layer_norm if family.startswith("gpt_neox") else base.norm
    layer, which = int(name.split(".")[1]), name.split(".")[2]
    if family == "gpt2":
        block = base.h[layer]
        return block.ln_1 if which == "ln1" else block.ln_2
    if family in ENCODERS:
        block = base.encoder.layer[layer]
        return block.attention.output.LayerNorm if which == "ln1" else block.output.LayerNorm
    block = base.layers[layer]
    return block.input_layernorm if which == "ln1" else block.post_attention_layernorm


def norm_names(family: str) -> list[str]:
    names = [f"blocks.{layer}.{ln}" for layer in range(N_LAYERS) for ln in ("ln1", "ln2")]
    return names if family in ENCODERS else [*names, "ln_final"]


@contextlib.contextmanager
def seen(module: torch.nn.Module) -> Iterator[dict]:
    """What `module` received and returned in the forward passes run in the block (plain torch hook, read only)."""
    record: dict = {}

    def hook(mod, args, output):
        record["input"], record["output"] = args[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def replaced_output(module: torch.nn.Module, edit) -> Iterator[None]:
    """A hand-made edit with a plain torch forward hook: `module` outputs `edit(input, output)`."""
    handle = module.register_forward_hook(lambda mod, args, output: edit(args[0], output))
    try:
        yield
    finally:
        handle.remove()


def logits_with(model: torch.nn.Module, module: torch.nn.Module, edit, inputs: torch.Tensor) -> torch.Tensor:
    with replaced_output(module, edit):
        return main_output(bare(model, inputs))


# --- names --------------------------------------------------------------------------------------------------------


def test_every_block_has_result_and_both_norms_scale_and_normalized(hf_model, family):
    names = nm.load(hf_model).hook_names
    for layer in range(N_LAYERS):
        for suffix in NEW_SUFFIXES:
            assert f"blocks.{layer}.{suffix}" in names
    assert ("ln_final.hook_scale" in names) == (family not in ENCODERS)


def test_result_comes_right_after_z_and_scale_right_before_normalized(hf_model):
    names = nm.load(hf_model).hook_names
    for layer in range(N_LAYERS):
        assert names.index(f"blocks.{layer}.attn.hook_result") == names.index(f"blocks.{layer}.attn.hook_z") + 1
        for ln in ("ln1", "ln2"):
            assert names.index(f"blocks.{layer}.{ln}.hook_normalized") == names.index(f"blocks.{layer}.{ln}.hook_scale") + 1


def test_each_norm_comes_before_its_sub_block_or_after_it_in_post_ln_blocks(hf_model, family):
    names = nm.load(hf_model).hook_names
    expected = ["ln1.hook_normalized", "attn.hook_q", "ln2.hook_normalized", "mlp.hook_pre"]
    if family in ENCODERS:  # post-LN: each LayerNorm follows its sub-block
        expected = ["attn.hook_q", "ln1.hook_normalized", "mlp.hook_pre", "ln2.hook_normalized"]
    order = [names.index(f"blocks.0.{suffix}") for suffix in expected]
    assert order == sorted(order)


def _new_points(family: str) -> list[str]:
    names = [f"blocks.*.{suffix}" for suffix in NEW_SUFFIXES]
    names += [] if family in ENCODERS else ["ln_final.hook_scale"]
    return names + (["hook_pos_embed"] if family in LEARNED_POSITIONS else [])


def test_capturing_the_new_points_keeps_the_output_bit_identical(hf_model, family):
    trace = nm.load(hf_model).run(tokens(), capture=_new_points(family))
    assert torch.equal(main_output(trace.output), main_output(bare(hf_model, tokens())))


def test_recording_gradients_at_the_new_points_keeps_the_output_bit_identical(hf_model, family):
    trace = nm.load(hf_model).run(tokens(), capture_grad=_new_points(family))
    assert torch.equal(main_output(trace.output).detach(), main_output(bare(hf_model, tokens())))


# --- hook_pos_embed ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
def test_pos_embed_is_the_position_embedding_of_every_prompt(learned):
    hf_model = make_model(learned)
    with seen(position_embedding(hf_model)) as hf:
        trace = nm.load(hf_model).run(tokens(batch=3), capture="hook_pos_embed")
    batch, pos = tokens(batch=3).shape
    assert trace["hook_pos_embed"].shape == (batch, pos, hf_model.config.hidden_size)
    assert torch.equal(trace["hook_pos_embed"], hf["output"].expand(batch, -1, -1))


@pytest.mark.parametrize("shared", ["gpt2", "bert"])
def test_pos_embed_shared_by_every_prompt_is_an_expanded_view_not_a_copy(shared):
    trace = nm.load(make_model(shared)).run(tokens(batch=3), capture="hook_pos_embed")
    assert trace["hook_pos_embed"].stride(0) == 0


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
def test_editing_one_prompts_pos_embed_in_place_equals_the_hand_made_edit(learned):
    hf_model = make_model(learned)

    def by_hand(args, output):
        edited = output.expand(tokens().shape[0], -1, -1).clone()
        edited[1, 3] = 0
        return edited

    def edit(pos_embed, hook):
        pos_embed[1, 3] = 0

    expected = logits_with(hf_model, position_embedding(hf_model), by_hand, tokens())
    trace = nm.load(hf_model).run(tokens(), interventions={"hook_pos_embed": edit})
    assert torch.equal(main_output(trace.output), expected)
    assert torch.equal(main_output(trace.output)[0], main_output(bare(hf_model, tokens()))[0])  # prompt 0 untouched


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
def test_a_returned_pos_embed_reaches_the_model_as_the_hand_made_edit(learned):
    hf_model = make_model(learned)
    shapes = []

    def double(pos_embed, hook):
        shapes.append(tuple(pos_embed.shape))
        return pos_embed * 2

    expected = logits_with(hf_model, position_embedding(hf_model), lambda a, o: o * 2, tokens())
    trace = nm.load(hf_model).run(tokens(), interventions={"hook_pos_embed": double})
    assert shapes == [(*tokens().shape, hf_model.config.hidden_size)]
    assert torch.equal(main_output(trace.output), expected)


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
@pytest.mark.parametrize("per", ["prompt", "position"])
def test_a_replacement_pos_embed_per_prompt_or_broadcast_equals_the_hand_made_edit(learned, per):
    hf_model = make_model(learned)
    batch, pos = tokens().shape
    d = hf_model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(batch, pos, d, generator=generator) if per == "prompt" else torch.randn(pos, d, generator=generator)
    expected = logits_with(hf_model, position_embedding(hf_model), lambda a, o: value.expand(batch, pos, d), tokens())
    trace = nm.load(hf_model).run(tokens(), interventions={"hook_pos_embed": value})
    assert torch.equal(main_output(trace.output), expected)


def test_pos_embed_has_every_prompts_batch_at_each_generation_step():
    """With the KV cache, each step after the first runs one new token per prompt."""
    model = nm.load(make_model("gpt2"))
    shapes = []
    record = {"hook_pos_embed": lambda pos_embed, hook: shapes.append(tuple(pos_embed.shape))}
    model.generate(tokens(batch=3, length=4), max_new_tokens=3, interventions=record)
    assert [shape[:2] for shape in shapes] == [(3, 4), (3, 1), (3, 1)]


def test_the_gradient_at_pos_embed_is_each_prompts_gradient_at_the_embedding_sum():
    """GPT-2 adds token and position embeddings, so both receive the same gradient, prompt by prompt."""
    model = nm.load(make_model("gpt2"))
    trace = model.run(tokens(), capture_grad=["hook_embed", "hook_pos_embed"])
    trace.logits[0, -1, 5].backward()
    assert torch.equal(trace.grad("hook_pos_embed"), trace.grad("hook_embed"))
    assert trace.grad("hook_pos_embed")[1].abs().sum() == 0  # prompt 1 does not reach prompt 0's logit


# --- attn.hook_result -------------------------------------------------------------------------------------------


def _projection_and_weight(hf_model, family, layer):
    """Block `layer`'s attention output projection and its weight as [in, out], found by hand."""
    projection = output_projection(hf_model, family, layer)
    weight = projection.weight if family == "gpt2" else projection.weight.T  # Conv1D stores [in, out]
    return projection, weight.detach()


def test_result_is_each_heads_z_through_its_rows_of_the_output_projection(hf_model, family):
    config = hf_model.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    for layer in range(N_LAYERS):
        projection, weight = _projection_and_weight(hf_model, family, layer)
        with seen(projection) as hf:
            trace = nm.load(hf_model).run(tokens(), capture=f"blocks.{layer}.attn.hook_result")
        z = hf["input"]
        expected = torch.stack(
            [z[..., h * d_head : (h + 1) * d_head] @ weight[h * d_head : (h + 1) * d_head] for h in range(n_heads)], dim=2
        )
        result = trace[f"blocks.{layer}.attn.hook_result"]
        assert result.shape == (*tokens().shape, n_heads, config.hidden_size)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-4)


def test_results_summed_over_heads_plus_the_bias_are_attn_out(hf_model, family):
    trace = nm.load(hf_model).run(tokens(), capture=["blocks.*.attn.hook_result", "blocks.*.hook_attn_out"])
    for layer in range(N_LAYERS):
        bias = output_projection(hf_model, family, layer).bias
        summed = trace[f"blocks.{layer}.attn.hook_result"].sum(2) + (0 if bias is None else bias.detach())
        torch.testing.assert_close(summed, trace[f"blocks.{layer}.hook_attn_out"], rtol=1e-5, atol=1e-4)


def test_zeroing_a_heads_result_equals_zeroing_its_z_slice_by_hand(hf_model, family):
    layer, head = 1, 2
    d_head = hf_model.config.hidden_size // hf_model.config.num_attention_heads

    def zero_slice(module, args):
        features = args[0].clone()
        features[..., head * d_head : (head + 1) * d_head] = 0
        return (features,)

    handle = output_projection(hf_model, family, layer).register_forward_pre_hook(zero_slice)
    try:
        expected = main_output(bare(hf_model, tokens()))
    finally:
        handle.remove()

    def zero_head(result, hook):
        result[:, :, head] = 0

    trace = nm.load(hf_model).run(tokens(), interventions={f"blocks.{layer}.attn.hook_result": zero_head})
    torch.testing.assert_close(main_output(trace.output), expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(expected, main_output(bare(hf_model, tokens())), rtol=1e-4, atol=1e-3)


def test_replacing_results_with_another_runs_equals_patching_the_projection_output_by_hand(hf_model, family):
    layer = 0
    clean, corrupt = tokens(seed=1), tokens(seed=2)
    model = nm.load(hf_model)
    name = f"blocks.{layer}.attn.hook_result"
    projection = output_projection(hf_model, family, layer)
    with seen(projection) as hf:
        clean_results = model.run(clean, capture=name)[name]
    expected = logits_with(hf_model, projection, lambda a, o: hf["output"], corrupt)
    trace = model.run(corrupt, interventions={name: clean_results})
    torch.testing.assert_close(main_output(trace.output), expected, rtol=1e-4, atol=1e-3)


def test_results_returned_unchanged_leave_the_output_bit_identical(hf_model):
    trace = nm.load(hf_model).run(tokens(), interventions={"blocks.*.attn.hook_result": lambda result, hook: result})
    assert torch.equal(main_output(trace.output), main_output(bare(hf_model, tokens())))


def test_the_gradient_at_each_heads_result_is_the_gradient_at_attn_out():
    """attn_out is the sum of the heads' results plus a bias: every head gets attn_out's gradient."""
    model = nm.load(make_model("llama"))
    trace = model.run(tokens(), capture_grad=["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"])
    trace.logits[:, -1].logsumexp(-1).sum().backward()
    per_head = trace.grad("blocks.0.attn.hook_result")
    for head in range(per_head.shape[2]):
        assert torch.equal(per_head[:, :, head], trace.grad("blocks.0.hook_attn_out"))


# --- norms: hook_normalized and hook_scale ----------------------------------------------------------------------


def test_normalized_is_each_norms_output(hf_model, family):
    for name in norm_names(family):
        with seen(norm_module(hf_model, family, name)) as hf:
            trace = nm.load(hf_model).run(tokens(), capture=f"{name}.hook_normalized")
        assert torch.equal(trace[f"{name}.hook_normalized"], hf["output"])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_post_ln_normalized_is_resid_mid_and_resid_post(encoder):
    trace = nm.load(make_model(encoder)).run(tokens(), capture=["blocks.*.hook_resid_*", "blocks.*.ln?.hook_normalized"])
    for layer in range(N_LAYERS):
        assert torch.equal(trace[f"blocks.{layer}.ln1.hook_normalized"], trace[f"blocks.{layer}.hook_resid_mid"])
        assert torch.equal(trace[f"blocks.{layer}.ln2.hook_normalized"], trace[f"blocks.{layer}.hook_resid_post"])


def test_scale_is_transformerlens_definition_computed_from_the_norms_input(hf_model, family):
    for name in norm_names(family):
        module = norm_module(hf_model, family, name)
        with seen(module) as hf:
            trace = nm.load(hf_model).run(tokens(), capture=f"{name}.hook_scale")
        x = hf["input"]
        if isinstance(module, torch.nn.LayerNorm):  # sqrt(mean((x - mean x)^2) + eps)
            expected = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        else:  # RMSNorm: sqrt(mean(x^2) + eps)
            expected = (x.square().mean(-1, keepdim=True) + module.variance_epsilon).sqrt()
        assert trace[f"{name}.hook_scale"].shape == (*tokens().shape, 1)
        torch.testing.assert_close(trace[f"{name}.hook_scale"], expected, rtol=1e-5, atol=1e-6)


def test_each_norms_output_is_its_input_over_the_scale_with_weight_and_bias(hf_model, family):
    for name in norm_names(family):
        module = norm_module(hf_model, family, name)
        with seen(module) as hf:
            trace = nm.load(hf_model).run(tokens(), capture=f"{name}.hook_scale")
        x = hf["input"]
        centred = x - x.mean(-1, keepdim=True) if isinstance(module, torch.nn.LayerNorm) else x
        bias = 0 if getattr(module, "bias", None) is None else module.bias.detach()
        expected = centred / trace[f"{name}.hook_scale"] * module.weight.detach() + bias
        torch.testing.assert_close(hf["output"], expected, rtol=1e-5, atol=1e-5)


def test_doubling_a_scale_halves_the_norms_output_before_its_bias_as_by_hand(hf_model, family):
    for name in norm_names(family):
        module = norm_module(hf_model, family, name)
        bias = 0 if getattr(module, "bias", None) is None else module.bias.detach()
        expected = logits_with(hf_model, module, lambda a, o: (o - bias) / 2 + bias, tokens())
        trace = nm.load(hf_model).run(tokens(), interventions={f"{name}.hook_scale": lambda scale, hook: scale * 2})
        torch.testing.assert_close(main_output(trace.output), expected, rtol=1e-4, atol=1e-4)


def test_a_scale_written_back_unchanged_leaves_the_output_bit_identical(hf_model):
    trace = nm.load(hf_model).run(tokens(), interventions={"*hook_scale": lambda scale, hook: scale.clone()})
    assert torch.equal(main_output(trace.output), main_output(bare(hf_model, tokens())))


def test_replacing_normalized_equals_replacing_the_norms_output_by_hand(hf_model, family):
    name = norm_names(family)[1]
    value = torch.randn(*tokens().shape, hf_model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    expected = logits_with(hf_model, norm_module(hf_model, family, name), lambda a, o: value, tokens())
    trace = nm.load(hf_model).run(tokens(), interventions={f"{name}.hook_normalized": value})
    assert torch.equal(main_output(trace.output), expected)


# --- cleanup ----------------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def _raise(activation, hook):
    raise Boom()


@pytest.mark.parametrize("where", ["hook_pos_embed", "blocks.1.attn.hook_result", "blocks.1.ln2.hook_scale"])
def test_the_new_points_leave_no_torch_hook_even_when_an_intervention_raises(where):
    hf_model = make_model("gpt2")
    model = nm.load(hf_model)
    new_points = model.resolve(_new_points("gpt2"))
    with pytest.raises(nm.InterventionError):
        model.run(tokens(), capture=new_points, interventions={where: _raise})
    with model.hooks({name: (lambda a, hook: None) for name in new_points}):
        assert any(is_neuronmap_hook(hook) for hook in hf_model.base_model._forward_pre_hooks.values())
    for module in hf_model.modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        assert not any(is_neuronmap_hook(hook) for hook in hooks), module
    assert model.list_hooks() == []
    assert torch.equal(main_output(model.run(tokens()).output), main_output(bare(hf_model, tokens())))
