"""Weights shaped as in TransformerLens: what they compute against the hook points, TransformerLens's own layout
(its weight conversions, written out here), and that they are views that never change the HF parameters."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import neuronmap as nm
from neuronmap.errors import WeightError
from neuronmap.weights import Weights
from conftest import ENCODERS, FAMILIES, ROTARY, config_for, make_model, output_projection, tokens

N_LAYERS = 2
DECODERS = [f for f in FAMILIES if f not in ENCODERS]
GQA = GATED = ["llama", "mistral", "qwen2"]
LEARNED_POSITIONS = ["gpt2", "bert", "roberta"]
PER_HEAD = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


@pytest.fixture(scope="module")
def weights(hf_model):
    return Weights(hf_model)


@pytest.fixture(scope="module")
def trace(hf_model):
    return nm.load(hf_model).run(tokens(), capture="*")


def _attention_input(trace, family, layer):
    """What q, k and v are computed from: the first norm's output (pre-LN), the block's input (post-LN: BERT)."""
    return trace[f"blocks.{layer}.hook_resid_pre" if family in ENCODERS else f"blocks.{layer}.ln1.hook_normalized"]


def _mlp_input(trace, family, layer):
    """What the MLP reads: the second norm's output (pre-LN), the first one's (post-LN: BERT)."""
    return trace[f"blocks.{layer}.{'ln1' if family in ENCODERS else 'ln2'}.hook_normalized"]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


# --- what the weights compute -----------------------------------------------------------------------------------


def test_q_is_the_normalized_input_through_W_Q_plus_b_Q_per_head(weights, trace, family):
    for layer in range(N_LAYERS):
        attn = weights.blocks[layer].attn
        q = torch.einsum("bpm,hmd->bphd", _attention_input(trace, family, layer), attn.W_Q) + attn.b_Q
        _close(q, trace[f"blocks.{layer}.attn.hook_q"])


def test_k_and_v_are_the_normalized_input_through_the_stored_key_value_heads(weights, trace, family):
    for layer in range(N_LAYERS):
        attn = weights.blocks[layer].attn
        x = _attention_input(trace, family, layer)
        _close(torch.einsum("bpm,hmd->bphd", x, attn._W_K) + attn._b_K, trace[f"blocks.{layer}.attn.hook_k"])
        _close(torch.einsum("bpm,hmd->bphd", x, attn._W_V) + attn._b_V, trace[f"blocks.{layer}.attn.hook_v"])


@pytest.mark.parametrize("gqa", GQA)
def test_W_K_and_W_V_repeat_each_key_value_head_for_its_query_heads(gqa):
    attn = Weights(make_model(gqa)).blocks[0].attn
    n_heads, n_kv = attn.W_Q.shape[0], attn._W_K.shape[0]
    assert n_kv < n_heads
    for head in range(n_heads):
        kv = head // (n_heads // n_kv)
        assert torch.equal(attn.W_K[head], attn._W_K[kv]) and torch.equal(attn.W_V[head], attn._W_V[kv])
        assert torch.equal(attn.b_K[head], attn._b_K[kv]) and torch.equal(attn.b_V[head], attn._b_V[kv])


def test_result_is_z_through_W_O_and_summed_plus_b_O_is_attn_out(weights, trace):
    for layer in range(N_LAYERS):
        attn = weights.blocks[layer].attn
        result = torch.einsum("bphd,hdm->bphm", trace[f"blocks.{layer}.attn.hook_z"], attn.W_O)
        _close(result, trace[f"blocks.{layer}.attn.hook_result"])
        _close(result.sum(2) + attn.b_O, trace[f"blocks.{layer}.hook_attn_out"])


def test_mlp_pre_is_the_normalized_input_through_W_in_or_W_gate(weights, trace, family):
    for layer in range(N_LAYERS):
        mlp = weights.blocks[layer].mlp
        x = _mlp_input(trace, family, layer)
        if mlp.W_gate is None:
            _close(x @ mlp.W_in + mlp.b_in, trace[f"blocks.{layer}.mlp.hook_pre"])
        else:  # gated: hook_pre is the gate, hook_pre_linear the up projection, as in TransformerLens
            _close(x @ mlp.W_gate, trace[f"blocks.{layer}.mlp.hook_pre"])
            _close(x @ mlp.W_in + mlp.b_in, trace[f"blocks.{layer}.mlp.hook_pre_linear"])


def test_mlp_out_is_mlp_post_through_W_out_plus_b_out(weights, trace):
    for layer in range(N_LAYERS):
        mlp = weights.blocks[layer].mlp
        _close(trace[f"blocks.{layer}.mlp.hook_post"] @ mlp.W_out + mlp.b_out, trace[f"blocks.{layer}.hook_mlp_out"])


@pytest.mark.parametrize("decoder", DECODERS)
def test_logits_are_the_final_normalized_stream_through_W_U_plus_b_U(decoder):
    hf_model = make_model(decoder)
    trace = nm.load(hf_model).run(tokens(), capture="ln_final.hook_normalized")
    weights = Weights(hf_model)
    _close(trace["ln_final.hook_normalized"] @ weights.W_U + weights.b_U, trace.logits)


def test_masked_lm_unembedding_is_the_decoder_with_its_bias():
    hf_model = transformers.BertForMaskedLM(config_for("bert")).eval()
    decoder = hf_model.cls.predictions.decoder
    weights = Weights(hf_model)
    assert torch.equal(weights.W_U, decoder.weight.T) and torch.equal(weights.b_U, decoder.bias)


def test_rows_of_W_E_are_hook_embed(weights, trace):
    assert torch.equal(weights.W_E[tokens()], trace["hook_embed"])


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
def test_first_rows_of_W_pos_are_hook_pos_embed(learned):
    hf_model = make_model(learned)
    trace = nm.load(hf_model).run(tokens(), capture="hook_pos_embed")
    assert torch.equal(Weights(hf_model).W_pos[: tokens().shape[1]], trace["hook_pos_embed"][0])


@pytest.mark.parametrize("learned", LEARNED_POSITIONS)
def test_W_pos_has_a_row_for_every_position_of_the_context(learned):
    hf_model = make_model(learned)
    assert Weights(hf_model).W_pos.shape == (nm.load(hf_model).context_length, hf_model.config.hidden_size)


# --- TransformerLens's layout, as its weight conversions (transformer_lens/pretrained/weight_conversions) build it


def _tl_attention(hf_model, family, layer):
    """W_Q, W_K, W_V, b_Q and W_O of block `layer` as TransformerLens's conversion lays them out (einops patterns
    in the comments), for comparison with ours."""
    base, config = hf_model.base_model, hf_model.config
    n, d = config.num_attention_heads, config.hidden_size
    if family == "gpt2":  # c_attn.weight split in 3 on dim 1, each "m (i h) -> i m h"; c_proj "(i h) m -> i h m"
        attn = base.h[layer].attn
        w_q, w_k, w_v = (w.unflatten(1, (n, -1)).permute(1, 0, 2) for w in attn.c_attn.weight.split(d, dim=1))
        b_q = attn.c_attn.bias.unflatten(0, (3, n, -1))[0]  # "(qkv index head) -> qkv index head"
        return w_q, w_k, w_v, b_q, attn.c_proj.weight.unflatten(0, (n, -1))
    if family.startswith("gpt_neox"):  # "(i qkv h) m -> qkv i m h"; dense "m (i h) -> i h m"
        attn = base.layers[layer].attention
        w = attn.query_key_value.weight.unflatten(0, (n, 3, -1)).permute(1, 0, 3, 2)
        b_q = attn.query_key_value.bias.unflatten(0, (n, 3, -1))[:, 0]  # "(index qkv head) -> qkv index head"
        return w[0], w[1], w[2], b_q, attn.dense.weight.unflatten(1, (n, -1)).permute(1, 2, 0)
    if family in ENCODERS:  # "(i h) m -> i m h"; output dense "m (i h) -> i h m"
        attn = base.encoder.layer[layer].attention
        q, k, v = attn.self.query, attn.self.key, attn.self.value
        w_q, w_k, w_v = (p.weight.unflatten(0, (n, -1)).permute(0, 2, 1) for p in (q, k, v))
        return w_q, w_k, w_v, q.bias.unflatten(0, (n, -1)), attn.output.dense.weight.unflatten(1, (n, -1)).permute(1, 2, 0)
    attn = base.layers[layer].self_attn  # llama: "(n h) m -> n m h" with n_kv heads for k, v (stored as _W_K, _W_V)
    n_kv = config.num_key_value_heads
    w_q = attn.q_proj.weight.unflatten(0, (n, -1)).permute(0, 2, 1)
    w_k, w_v = (p.weight.unflatten(0, (n_kv, -1)).permute(0, 2, 1) for p in (attn.k_proj, attn.v_proj))
    b_q = torch.zeros(n, w_q.shape[2]) if attn.q_proj.bias is None else attn.q_proj.bias.unflatten(0, (n, -1))
    return w_q, w_k, w_v, b_q, attn.o_proj.weight.unflatten(1, (n, -1)).permute(1, 2, 0)


def test_attention_weights_have_transformerlens_layout(hf_model, family, weights):
    for layer in range(N_LAYERS):
        attn = weights.blocks[layer].attn
        w_q, w_k, w_v, b_q, w_o = _tl_attention(hf_model, family, layer)
        assert torch.equal(attn.W_Q, w_q) and torch.equal(attn.b_Q, b_q) and torch.equal(attn.W_O, w_o)
        assert torch.equal(attn._W_K, w_k) and torch.equal(attn._W_V, w_v)


def test_mlp_weights_have_transformerlens_layout(hf_model, family, weights):
    """W_in [d_model, d_mlp] and W_out [d_mlp, d_model]: nn.Linear weights transposed, GPT-2's Conv1D as stored."""
    mlp = weights.blocks[0].mlp
    base = hf_model.base_model
    if family == "gpt2":
        w_in, w_out = base.h[0].mlp.c_fc.weight, base.h[0].mlp.c_proj.weight
    elif family.startswith("gpt_neox"):
        w_in, w_out = base.layers[0].mlp.dense_h_to_4h.weight.T, base.layers[0].mlp.dense_4h_to_h.weight.T
    elif family in ENCODERS:
        block = base.encoder.layer[0]
        w_in, w_out = block.intermediate.dense.weight.T, block.output.dense.weight.T
    else:
        gated = base.layers[0].mlp
        w_in, w_out = gated.up_proj.weight.T, gated.down_proj.weight.T
        assert torch.equal(mlp.W_gate, gated.gate_proj.weight.T)
    assert torch.equal(mlp.W_in, w_in) and torch.equal(mlp.W_out, w_out)


def test_stacked_weights_are_the_blocks_stacked_as_transformerlens_model_weights(weights, hf_model):
    config = hf_model.config
    n, d = config.num_attention_heads, config.hidden_size
    assert weights.W_Q.shape == weights.W_K.shape == weights.W_V.shape == (N_LAYERS, n, d, d // n)
    assert weights.W_O.shape == (N_LAYERS, n, d // n, d)
    assert weights.b_O.shape == (N_LAYERS, d)
    for name in PER_HEAD:
        for layer in range(N_LAYERS):
            assert torch.equal(getattr(weights, name)[layer], getattr(weights.blocks[layer].attn, name))
    for name in ("W_in", "W_out", "b_in", "b_out"):
        assert torch.equal(getattr(weights, name)[1], getattr(weights.blocks[1].mlp, name))


def test_W_gate_is_there_only_for_gated_mlps(weights, family):
    assert (weights.W_gate is None) == (family not in GATED)


def test_missing_biases_are_zeros_as_in_transformerlens():
    weights = Weights(make_model("llama"))  # Llama has no bias anywhere
    for name in ("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U"):
        value = getattr(weights, name)
        assert not value.any(), name


# --- never modifying, and views -----------------------------------------------------------------------------------


def _read_everything(weights: Weights) -> list[torch.Tensor]:
    """Every weight the model has: each stacked one (which reads every block's), W_E, and W_pos, W_U, b_U if any."""
    names = ["W_E", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in", "b_out"]
    values = [getattr(weights, name) for name in names]
    for optional in ("W_pos", "W_U", "b_U"):
        with contextlib.suppress(WeightError):
            values.append(getattr(weights, optional))
    return [value for value in values if value is not None]


@pytest.mark.parametrize("each", FAMILIES)
def test_building_and_reading_the_weights_changes_no_parameter(each):
    hf_model = make_model(each)
    before = {name: value.clone() for name, value in hf_model.state_dict().items()}
    values = _read_everything(Weights(hf_model))
    after = hf_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(value.requires_grad for value in values)


def _query_key_and_mlp_out(hf_model, family):
    """Block 0's query and key projections and MLP output projection, found by hand."""
    base = hf_model.base_model
    if family == "gpt2":
        return base.h[0].attn.c_attn, base.h[0].attn.c_attn, base.h[0].mlp.c_proj
    if family.startswith("gpt_neox"):
        qkv = base.layers[0].attention.query_key_value
        return qkv, qkv, base.layers[0].mlp.dense_4h_to_h
    if family in ENCODERS:
        block = base.encoder.layer[0]
        return block.attention.self.query, block.attention.self.key, block.output.dense
    block = base.layers[0]
    return block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.down_proj


def test_per_block_weights_are_views_sharing_the_hf_parameters_memory(hf_model, family, weights):
    def same_memory(view, parameter):
        return view.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr()

    query, key, mlp_out = _query_key_and_mlp_out(hf_model, family)
    projection = output_projection(hf_model, family, 0)
    assert same_memory(weights.W_E, hf_model.get_input_embeddings().weight)
    assert same_memory(weights.blocks[0].attn.W_Q, query.weight)
    assert same_memory(weights.blocks[0].attn._W_K, key.weight)
    assert same_memory(weights.blocks[0].attn.W_O, projection.weight)
    assert same_memory(weights.blocks[0].mlp.W_out, mlp_out.weight)
    if projection.bias is not None:
        assert same_memory(weights.blocks[0].attn.b_O, projection.bias)


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotary", ROTARY)
def test_W_pos_of_a_rotary_model_says_it_uses_rotary_positions(rotary):
    hf_model = make_model(rotary)
    with pytest.raises(WeightError, match=rf"{hf_model.config.model_type} model has no W_pos: it uses rotary position"):
        Weights(hf_model).W_pos


def test_a_module_without_an_adapter_has_no_transformerlens_weights():
    with pytest.raises(WeightError, match=r"family with an adapter \(bert, gpt2, .*\); this is a Linear"):
        Weights(torch.nn.Linear(4, 4))


def test_W_U_of_an_encoder_without_its_head_names_the_missing_head():
    with pytest.raises(WeightError, match=r"BertModel has no language-model head, so no unembedding W_U"):
        Weights(make_model("bert")).W_U


def test_a_missing_weight_is_a_neuronmap_error_and_an_attribute_error():
    weights = Weights(make_model("llama"))
    with pytest.raises(nm.NeuronMapError) as raised:
        weights.W_pos
    assert isinstance(raised.value, AttributeError)
    assert not hasattr(weights, "W_pos")


# --- on the Model, as on a TransformerLens model ------------------------------------------------------------------


def test_model_exposes_the_weights_as_a_transformerlens_model_does():
    hf_model = make_model("gpt2")
    model, expected = nm.load(hf_model), Weights(hf_model)
    for name in ("W_E", "W_U", "b_U", "W_pos", *PER_HEAD, "b_O", "W_in", "W_out", "b_in", "b_out"):
        assert torch.equal(getattr(model, name), getattr(expected, name)), name
    assert model.W_gate is None
    assert torch.equal(model.weights.blocks[1].attn.W_Q, hf_model.transformer.h[1].attn.c_attn.weight[:, :32].view(32, 4, 8).transpose(0, 1))


def test_a_weight_the_model_lacks_is_absent_from_the_model_as_from_transformerlens():
    model = nm.load(make_model("llama"))
    assert hasattr(model, "W_Q") and not hasattr(model, "W_pos")
    assert not hasattr(nm.load(torch.nn.Sequential(torch.nn.Linear(4, 4))), "W_E")
