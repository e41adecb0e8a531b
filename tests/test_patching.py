"""Patching sweeps against one plain forward per cell: torch hooks written here, or one `model.run` per cell.

Every shortcut (resuming at the patched layer, running only positions >= p with HF's KV cache, stacking cells
in the batch) must give the values of the plain loop; the tests force each shortcut on and off.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import neuronmap as nm
from neuronmap.patching import engine
from neuronmap.patching.cells import plan
from conftest import WORDS, config_for, make_model, output_projection, word_tokenizer

DECODERS = ["gpt2", "gpt_neox", "llama"]
CORRECT, WRONG = [5, 6, 7], [8, 9, 10]
CLEAN = [" ".join(WORDS[5:12]), " ".join(WORDS[7:11]), " ".join(WORDS[3:9])]
CORRUPT = [prompt.replace(WORDS[8], WORDS[15]) for prompt in CLEAN]


@pytest.fixture(params=["left", "right"])
def padding(request):
    return request.param


def load(family: str, padding: str = "left") -> nm.Model:
    tokenizer = word_tokenizer()
    tokenizer.padding_side = padding
    hf = make_model(family) if family not in ("bert",) else masked_lm()
    return nm.load(hf, tokenizer)


def masked_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config_for("bert")).eval()


def logit_diff_by_hand(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    at_last = logits[torch.arange(len(last)), last]
    return (at_last[torch.arange(3), CORRECT] - at_last[torch.arange(3), WRONG]).mean()


@pytest.fixture(params=["plain", "every shortcut separately"])
def shortcuts(request, monkeypatch):
    """Default grouping, or one forward per (layer, position) so that the KV-cache path runs from every position."""
    if request.param != "plain":
        monkeypatch.setattr(engine, "FORWARD_OVERHEAD", 0)
    return request.param


# --- against torch hooks written here ---------------------------------------------------------------------------


def _blocks(hf, family):
    base = hf.base_model
    return base.h if family == "gpt2" else base.layers


@pytest.mark.parametrize("family", DECODERS)
def test_residual_sweep_equals_a_loop_of_torch_pre_hooks_on_the_blocks(family, padding, shortcuts):
    model = load(family, padding)
    hf, batch = model.module, model._batch(CORRUPT)
    clean = model._batch(CLEAN)
    blocks = _blocks(hf, family)
    inputs = {}
    handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: inputs.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad():
        hf(input_ids=clean.tokens, attention_mask=clean.attention_mask)
    for handle in handles:
        handle.remove()
    length = batch.tokens.shape[1]
    expected = torch.empty(len(blocks), length)
    for layer, block in enumerate(blocks):
        for p in range(length):
            def replace(module, args, kwargs, layer=layer, p=p):
                hidden = (args[0] if args else kwargs["hidden_states"]).clone()
                hidden[:, p] = inputs[layer][:, p]
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

            handle = block.register_forward_pre_hook(replace, with_kwargs=True)
            with torch.no_grad():
                logits = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
            handle.remove()
            expected[layer, p] = logit_diff_by_hand(logits, batch.last_positions)
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "resid_pre", "layer_pos", progress=False)
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_head_sweep_equals_a_loop_of_torch_pre_hooks_on_the_output_projection(family, padding):
    model = load(family, padding)
    hf, batch, clean = model.module, model._batch(CORRUPT), model._batch(CLEAN)
    n_heads = hf.config.num_attention_heads
    projections = [output_projection(hf, family, layer) for layer in range(2)]
    seen = {}
    handles = [p.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone())) for i, p in enumerate(projections)]
    with torch.no_grad():
        hf(input_ids=clean.tokens, attention_mask=clean.attention_mask)
    for handle in handles:
        handle.remove()
    expected = torch.empty(2, n_heads)
    for layer, projection in enumerate(projections):
        for head in range(n_heads):
            def replace(module, args, layer=layer, head=head):
                x = args[0].clone()
                d = x.shape[-1] // n_heads
                x[..., head * d : (head + 1) * d] = seen[layer][..., head * d : (head + 1) * d]
                return (x,)

            handle = projection.register_forward_pre_hook(replace)
            with torch.no_grad():
                logits = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
            handle.remove()
            expected[layer, head] = logit_diff_by_hand(logits, batch.last_positions)
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "z", "layer_head", progress=False)
    assert result.axes == ["layer", "head"]
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)


# --- every sweep against one model.run per cell -------------------------------------------------------------------


def loop(model: nm.Model, what: str, by: str, direction: str = "denoise", metric=None) -> torch.Tensor:
    """One `model.run` per cell with the cell's source values written in: the plain reference."""
    target, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    batch = model._batch(target)
    captured = model.run(source, capture="*")
    sweep = plan(model, what, by, [str(i) for i in range(batch.tokens.shape[1])])
    values = []
    for cell in sweep.cells:
        def write(activation, hook, cell=cell):
            activation[cell.index] = captured[cell.name][cell.index]

        logits = model.run(target, interventions={cell.name: write}).logits
        values.append(logit_diff_by_hand(logits, batch.last_positions) if metric is None else metric(logits).mean())
    return torch.stack(values).reshape([len(labels) for _, labels in sweep.axes])


SWEEPS = [
    ("resid_mid", "layer_pos"),
    ("resid_post", "layer_pos"),
    ("attn_out", "layer_pos"),
    ("mlp_out", "layer_pos"),
    ("z", "layer_head_pos"),
    ("q", "layer_head"),
    ("k", "layer_head"),
    ("v", "layer_head"),
    ("pattern", "layer_head"),
    ("result", "layer_head"),
    ("v", "layer_head_pos"),
]


@pytest.mark.parametrize("what, by", SWEEPS)
@pytest.mark.parametrize("family", DECODERS)
def test_every_sweep_equals_one_run_per_cell(family, what, by, shortcuts):
    model = load(family)
    if f"blocks.0.{nm.patching.COMPONENTS[what]}" not in model.hook_names:
        pytest.skip(f"{family} has no {what} (parallel attention and MLP)")
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), what, by, progress=False)
    torch.testing.assert_close(result.raw, loop(model, what, by), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_noising_puts_corrupted_activations_into_the_clean_run(family, padding, shortcuts):
    model = load(family, padding)
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "resid_post", direction="noise", progress=False)
    torch.testing.assert_close(result.raw, loop(model, "resid_post", "layer_pos", "noise"), rtol=0, atol=1e-5)


def test_hook_names_and_globs_are_patched_whole():
    model = load("gpt2")
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "blocks.*.hook_attn_out", progress=False)
    assert result.labels == [["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]]
    expected = loop(model, "attn_out", "layer")
    torch.testing.assert_close(result.raw, expected, rtol=0, atol=1e-5)


def test_a_small_memory_budget_runs_one_cell_per_forward_with_the_same_values():
    model = load("llama")
    metric = nm.patching.logit_diff(CORRECT, WRONG)
    stacked = nm.patch(model, CLEAN, CORRUPT, metric, "z", "layer_head_pos", progress=False)
    single = nm.patch(model, CLEAN, CORRUPT, metric, "z", "layer_head_pos", memory_budget=1, progress=False)
    assert single.forwards > stacked.forwards
    torch.testing.assert_close(single.raw, stacked.raw, rtol=0, atol=1e-5)


def test_rows_whose_patch_writes_what_is_already_there_take_no_forward():
    model = load("gpt2", "left")
    differs = model._batch(CORRUPT).tokens != model._batch(CLEAN).tokens
    first = differs.int().argmax(1)  # each prompt's first corrupted position
    # one row per forward: layer 0 differs only at the corrupted tokens; layer 1 (causal) from the first one on
    expected = int(differs.sum()) + int((differs.shape[1] - first).sum())
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "resid_pre", memory_budget=1, progress=False)
    assert result.forwards == expected
    torch.testing.assert_close(result.raw, loop(model, "resid_pre", "layer_pos"), rtol=0, atol=1e-5)


def test_a_bidirectional_model_gets_the_layer_shortcut_only():
    model = load("bert")

    def masked_logit(logits):  # any function of the logits, one value per prompt
        return logits[:, 1, 5] - logits[:, 1, 6]

    result = nm.patch(model, CLEAN, CORRUPT, masked_logit, "resid_pre", "layer_pos", progress=False)
    torch.testing.assert_close(result.raw, loop(model, "resid_pre", "layer_pos", metric=masked_logit), rtol=0, atol=1e-5)


# --- normalisation and metrics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", DECODERS)
def test_patching_everything_gives_1_and_nothing_gives_0(family, padding):
    model = load(family, padding)
    metric = nm.patching.logit_diff(CORRECT, WRONG)
    everything = nm.patch(model, CLEAN, CORRUPT, metric, "hook_embed", progress=False)
    gap = abs(everything.clean - everything.corrupt)
    assert everything.raw.item() == pytest.approx(everything.clean, abs=1e-5)
    assert everything.values.item() == pytest.approx(1, abs=1e-5 / gap)
    sweep = nm.patch(model, CLEAN, CORRUPT, metric, "resid_pre", "layer_pos", layers=[0], progress=False)
    batch = model._batch(CORRUPT)
    same = (model._batch(CLEAN).tokens == batch.tokens).all(0)  # positions where no prompt was corrupted
    assert same.any() and sweep.raw[0, same].sub(sweep.corrupt).abs().max() < 1e-5
    assert sweep.clean == pytest.approx(logit_diff_by_hand(model.run(CLEAN).logits, batch.last_positions).item(), abs=1e-6)


def test_each_metric_equals_its_definition_computed_by_hand():
    model = load("gpt2")
    clean, corrupt = model.run(CLEAN).logits, model.run(CORRUPT).logits
    batch = model._batch(CLEAN)
    last = batch.last_positions
    rows = torch.arange(3)

    def at_last(logits):
        return logits[rows, last]

    log_probs = at_last(corrupt).log_softmax(-1)
    clean_log_probs = at_last(clean).log_softmax(-1)
    targets, counted = batch.tokens[:, 1:], (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).float()
    token_loss = -corrupt[:, :-1].log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    expected = {
        "prob": log_probs[rows, CORRECT].exp().mean(),
        "logprob": log_probs[rows, CORRECT].mean(),
        "loss": ((token_loss * counted).sum(1) / counted.sum(1)).mean(),
        "kl": (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1).mean(),
    }
    metrics = {
        "prob": nm.patching.prob(CORRECT),
        "logprob": nm.patching.logprob(CORRECT),
        "loss": nm.patching.loss(),
        "kl": nm.patching.kl(),
    }
    for name, metric in metrics.items():
        result = nm.patch(model, CLEAN, CORRUPT, metric, "hook_embed", progress=False)
        assert result.corrupt == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), name
    assert nm.patch(model, CLEAN, CORRUPT, nm.patching.kl(), "hook_embed", progress=False).clean == pytest.approx(0, abs=1e-6)


def test_string_answers_are_single_tokens():
    model = load("gpt2")
    by_string = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(WORDS[5], WORDS[8]), "hook_embed", progress=False)
    by_id = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(5, 8), "hook_embed", progress=False)
    assert by_string.corrupt == by_id.corrupt


# --- the result ----------------------------------------------------------------------------------------------------


def test_the_result_labels_its_axes_and_lists_the_strongest_cells():
    model = load("gpt2")
    result = nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "resid_pre", progress=False)
    length = model._batch(CLEAN).tokens.shape[1]
    assert result.axes == ["layer", "position"] and result.values.shape == (2, length)
    assert result.labels[1][0] == f"0 {model.to_str_tokens(CLEAN[0])[0]}"
    top = result.top(3)
    flat = result.values.flatten().abs()
    assert [abs(value) for _, value in top] == pytest.approx(flat.sort(descending=True).values[:3].tolist())
    layer, position = top[0][0]
    assert result.values[int(layer), result.labels[1].index(position)].item() == top[0][1]
    assert "resid_pre by layer × position [2 × 7]" in repr(result)
    assert (result.to_numpy() == result.values.numpy()).all()


# --- bad input -----------------------------------------------------------------------------------------------------


def _untouched(model: nm.Model) -> None:
    assert model.list_hooks() == []
    assert all("forward" not in block.__dict__ for block in _blocks(model.module, "gpt2"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(corrupt=CORRUPT[:2]), r"3 clean prompts but 2 corrupted:"),
        (dict(corrupt=[CORRUPT[0], CORRUPT[1] + " " + WORDS[3], CORRUPT[2]]), r"clean prompt 1 is 4 tokens but corrupted prompt 1 is 5"),
        (dict(metric=nm.patching.logit_diff(WORDS[5] + " " + WORDS[6], 8)), r"correct answer .* is 2 tokens"),
        (dict(metric=nm.patching.logit_diff(CORRECT[:2], WRONG)), r"correct answers: 2 given for 3 prompts"),
        (dict(metric=lambda logits: logits.mean()), r"must return one value per prompt, a tensor of shape \[3\], but returned \[\]"),
        (dict(what="blocks.0.hook_resid_pr"), r"blocks.0.hook_resid_pre"),
        (dict(what="z", heads=[4]), r"head 4 is out of range: there are 4"),
        (dict(what="resid_pre", by="layer_head"), r"resid_pre has no heads"),
        (dict(what="pattern", by="layer_pos"), r"pattern cannot be patched by position"),
        (dict(direction="sideways"), r"direction must be one of"),
        (dict(layers=[2]), r"layer 2 is out of range"),
    ],
)
def test_bad_input_is_a_clear_error_before_the_sweep(kwargs, message):
    model = load("gpt2")
    arguments = dict(clean=CLEAN, corrupt=CORRUPT, metric=nm.patching.logit_diff(CORRECT, WRONG), what="resid_pre") | kwargs
    with pytest.raises(nm.NeuronMapError, match=message):
        nm.patch(model, progress=False, **arguments)
    _untouched(model)


def test_a_failing_metric_leaves_no_hook_and_no_skipped_block():
    model = load("gpt2")
    calls = []

    def failing(logits):
        calls.append(len(logits))
        if len(calls) > 2:  # the clean and corrupted runs pass; the sweep's first forward fails
            raise RuntimeError("boom")
        return logits[:, -1, 5]

    with pytest.raises(RuntimeError, match="boom"):
        nm.patch(model, CLEAN, CORRUPT, failing, "resid_pre", "layer_pos", progress=False)
    _untouched(model)


def test_long_sweeps_show_a_progress_bar(capsys):
    model = load("gpt2")
    nm.patch(model, CLEAN, CORRUPT, nm.patching.logit_diff(CORRECT, WRONG), "z", "layer_head_pos", memory_budget=1, progress=True)
    assert "patching z" in capsys.readouterr().err


def test_a_module_without_an_adapter_is_refused_before_any_forward():
    model = nm.load(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)))
    with pytest.raises(nm.NeuronMapError, match=r"patching needs a model of a family NeuronMap has an adapter for"):
        nm.patch(model, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), lambda logits: logits[:, 0, 0], progress=False)
