"""Trace: access, capture options, padding, and its rendering (the first object under the rendering contract)."""

from __future__ import annotations

import pytest
import torch

import neuronmap as nm
from conftest import make_model, tokens


def test_trace_is_a_read_only_mapping_of_what_was_captured():
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.*.hook_resid_post")
    assert list(trace) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert "blocks.0.hook_resid_post" in trace and "blocks.0.hook_resid_pre" not in trace
    assert len(trace) == 2
    assert trace.nbytes == 2 * 2 * 9 * 32 * 4


def test_a_hook_point_that_was_not_captured_says_so_and_how_to_capture_it():
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.0.hook_resid_post")
    with pytest.raises(nm.NotCapturedError) as raised:
        trace["blocks.0.hook_resid_mid"]
    message = str(raised.value)
    assert "'blocks.0.hook_resid_mid' was not captured in this run" in message
    assert "model.run(..., capture='blocks.0.hook_resid_mid')" in message
    assert "captured: 'blocks.0.hook_resid_post'" in message and "not a hook point" not in message
    assert isinstance(raised.value, KeyError)


def test_a_name_that_is_no_hook_point_suggests_the_closest():
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.0.hook_resid_post")
    with pytest.raises(nm.HookNameError, match=r"is not a hook point of this model; did you mean 'blocks\.0\.hook_resid_mid'"):
        trace["blocks.0.hook_resid_mdi"]


def test_capture_options_move_cast_and_cut_positions():
    model = nm.load(make_model("gpt2"))
    names = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
    full = model.run(tokens(), capture=names)
    last = model.run(tokens(), capture=names, capture_positions=-1, capture_dtype=torch.float16, capture_device="cpu")
    assert last["blocks.0.hook_resid_post"].dtype == torch.float16
    assert torch.equal(last["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, -1:].half())
    assert torch.equal(last["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"][:, :, -1:].half())
    some = model.run(tokens(), capture=names, capture_positions=[0, 2])
    assert torch.equal(some["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, [0, 2]])


def test_kept_positions_do_not_pin_the_full_activation():
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.0.hook_resid_post", capture_positions=slice(0, 1))
    kept = trace["blocks.0.hook_resid_post"]
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()


def test_padded_strings_give_each_prompt_the_activations_it_gets_alone(tokenizer):
    model = nm.load(make_model("gpt2"), tokenizer=tokenizer)
    prompts = ["when mary and john went to the store", "the cat sat"]
    batch = model.run(prompts, capture="blocks.1.hook_resid_post", capture_positions="last")
    assert batch.str_tokens[1] == ["the", "cat", "sat"]
    assert batch.attention_mask.tolist()[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    for row, prompt in enumerate(prompts):
        alone = model.run(prompt, capture="blocks.1.hook_resid_post")
        torch.testing.assert_close(batch["blocks.1.hook_resid_post"][row, 0], alone["blocks.1.hook_resid_post"][0, -1], rtol=1e-5, atol=1e-5)
        length = len(alone.str_tokens[0])
        torch.testing.assert_close(batch.logits[row, :length], alone.logits[0], rtol=1e-5, atol=1e-5)


def test_repr_is_one_informative_line():
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.0.hook_resid_post")
    text = repr(trace)
    assert "\n" not in text and "tokens [2, 9]" in text and "1 activations" in text


def test_html_is_a_compact_table_with_escaped_text(tmp_path):
    trace = nm.load(make_model("gpt2")).run(tokens(), capture="blocks.*.hook_resid_post")
    trace.model_name = '<script>alert(1)</script>"&<>\''
    html = trace._repr_html_()
    assert "<script>alert(1)" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&amp;&lt;&gt;&#x27;" in html
    assert html.count("<tr>") == 3 and "2×9×32" in html and "2.2 KiB" in html
    assert "http" not in html
    trace.save_html(tmp_path / "trace.html")
    assert (tmp_path / "trace.html").read_text().startswith("<!doctype html>")
