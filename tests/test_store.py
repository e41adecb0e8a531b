"""The activation store: stored rows against `model.run` captures of the same batches, the row -> token maps, every
input kind, lazy reads, shuffled minibatches, resuming, and bad input (the file left untouched)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import neuronmap as nm
from neuronmap.errors import HookNameError, InputError, StoreError

TEXTS = [
    "When Mary and John went to the store, John gave a drink to Mary",
    "the cat sat on the mat",
    "",
    "a dog ran to the park and the cat sat " * 6,  # longer than the 16-token windows below
    "hi",
    "Mary and John",
    "when john went to the park mary gave a drink to the dog",
]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def model():
    return nm.load("ioi")


def windows_of(model, texts, context):
    """(document, start, token ids) of every window, cut by hand from the model's own tokenisation."""
    out = []
    for d, text in enumerate(texts):
        ids = model.tokenizer(text)["input_ids"]
        out += [(d, s, ids[s : s + context]) for s in range(0, len(ids), context)]
    return out


def reference(model, windows, batch_size, hook, dtype=torch.float16, select=None):
    """Rows of `hook` for `windows` run in batches of `batch_size`, right-padded by hand, through `model.run`."""
    rows = []
    filled = [w for w in windows if w[2]]
    for i in range(0, len(filled), batch_size):
        group = filled[i : i + batch_size]
        width = max(len(w[2]) for w in group)
        tokens = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for r, (_, _, ids) in enumerate(group):
            tokens[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        activation = model.run(tokens, attention_mask=mask, capture=hook, capture_dtype=dtype)[hook]
        for r, (_, _, ids) in enumerate(group):
            kept = list(range(len(ids))) if select is None else select(len(ids))
            rows.append(activation[r, kept])
    return torch.cat(rows)


def test_rows_equal_model_run_bit_for_bit_with_padding_and_split_documents(model, tmp_path):
    store = nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", batch_size=3, context_length=16, progress=False)
    windows = windows_of(model, TEXTS, 16)
    assert len(store) == sum(len(w[2]) for w in windows) == len(store.tokens)
    for hook in HOOKS:
        assert torch.equal(store[hook][:], reference(model, windows, 3, hook))
    assert store["blocks.1.attn.hook_z"].shape == (len(store), 4, 32)
    assert store.progress.complete and store.status == "complete"


def test_every_row_maps_back_to_its_document_position_and_token(model, tmp_path):
    store = nm.extract(model, TEXTS, "blocks.0.hook_resid_post", tmp_path / "a.h5", batch_size=2, context_length=16,
                       progress=False)
    expected = [(d, p, tok) for d, text in enumerate(TEXTS)
                for p, tok in enumerate(model.to_str_tokens(torch.tensor(model.tokenizer(text)["input_ids"])))]
    assert store.locate(slice(None)) == expected
    assert store.str_tokens(slice(None)) == [t for _, _, t in expected]
    offsets = store.documents.tolist()
    assert len(offsets) == len(TEXTS) + 1 and offsets[-1] == len(store)
    for d, text in enumerate(TEXTS):
        rows = range(offsets[d], offsets[d + 1])
        assert [store.locate(r)[0] for r in rows] == [d] * len(rows)
        assert len(rows) == len(model.tokenizer(text)["input_ids"])  # the empty document has no rows
    assert store.tokens.tolist() == [i for t in TEXTS for i in model.tokenizer(t)["input_ids"]]
    assert store.locate(-1) == expected[-1]
    assert store.str_tokens([3, 0]) == [expected[3][2], expected[0][2]]


@pytest.mark.parametrize("positions, select", [
    ("last", lambda n: [n - 1]),
    (slice(1, None), lambda n: list(range(1, n))),
    (2, lambda n: [2] if n > 2 else []),
])
def test_positions_keep_only_those_rows(model, tmp_path, positions, select):
    store = nm.extract(model, TEXTS, "blocks.1.hook_resid_post", tmp_path / "p.h5", batch_size=4, context_length=16,
                       positions=positions, progress=False)
    windows = windows_of(model, TEXTS, 16)
    assert torch.equal(store["blocks.1.hook_resid_post"][:], reference(model, windows, 4, "blocks.1.hook_resid_post",
                                                                      select=select))
    assert store.locate(slice(None)) == [(d, s + p, model.to_str_tokens(torch.tensor(ids[p]))[0])
                                         for d, s, ids in windows for p in select(len(ids))]


def test_bfloat16_and_float32_are_stored_exactly(model, tmp_path):
    for dtype in (torch.bfloat16, torch.float32):
        store = nm.extract(model, TEXTS[:3], "blocks.0.hook_resid_post", tmp_path / f"{dtype}.h5", dtype=dtype,
                           progress=False)
        rows = store["blocks.0.hook_resid_post"][:]
        assert rows.dtype == dtype
        assert torch.equal(rows, reference(model, windows_of(model, TEXTS[:3], 48), 16, "blocks.0.hook_resid_post", dtype))


def test_every_input_kind_gives_the_same_store(model, tmp_path):
    texts = [t for t in TEXTS if "\n" not in t]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    with open(tmp_path / "docs.jsonl", "w") as handle:
        for t in texts:
            handle.write(json.dumps({"id": 1, "body": t}) + "\n\n")
    hook = "blocks.1.hook_resid_post"
    base = nm.extract(model, texts, hook, tmp_path / "list.h5", batch_size=2, context_length=16, progress=False)
    variants = {
        "text file": tmp_path / "docs.txt",
        "jsonl": str(tmp_path / "docs.jsonl"),
        "generator": (t for t in texts),
        "records": [{"body": t} for t in texts],
    }
    for name, inputs in variants.items():
        other = nm.extract(model, inputs, hook, tmp_path / f"{len(name)}{name[0]}.h5", batch_size=2, context_length=16,
                           text_field="body", progress=False)
        assert torch.equal(other[hook][:], base[hook][:]), name
        assert other.locate(slice(None)) == base.locate(slice(None)), name


def test_token_tensors_one_stream_or_one_document_per_row(model, tmp_path):
    stream = torch.randint(3, 151, (100,), generator=torch.Generator().manual_seed(0))
    store = nm.extract(model, stream, "blocks.0.hook_resid_post", tmp_path / "s.h5", context_length=32, batch_size=2,
                       progress=False)
    windows = [(0, s, stream[s : s + 32].tolist()) for s in range(0, 100, 32)]
    assert torch.equal(store["blocks.0.hook_resid_post"][:], reference(model, windows, 2, "blocks.0.hook_resid_post"))
    assert store.locate(99) == (0, 99, model.to_str_tokens(stream[99])[0])
    rows = stream[:90].reshape(3, 30)
    store = nm.extract(model, rows, "blocks.0.hook_resid_post", tmp_path / "r.h5", progress=False)
    assert store.documents.tolist() == [0, 30, 60, 90] and torch.equal(store.tokens, rows.flatten())
    ragged = [row[: 10 + 5 * i].tolist() for i, row in enumerate(rows)]  # lists of ids, of different lengths
    other = nm.extract(model, ragged, "blocks.0.hook_resid_post", tmp_path / "l.h5", batch_size=2, progress=False)
    windows = [(d, 0, ids) for d, ids in enumerate(ragged)]
    assert torch.equal(other["blocks.0.hook_resid_post"][:], reference(model, windows, 2, "blocks.0.hook_resid_post"))


def test_lazy_view_reads_only_what_is_asked(model, tmp_path):
    store = nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", batch_size=3, context_length=16, progress=False)
    view, full = store["blocks.1.attn.hook_z"], store["blocks.1.attn.hook_z"][:]
    assert torch.equal(view[5:20], full[5:20]) and torch.equal(view[-1], full[-1])
    assert torch.equal(view[[40, 3, 3, 7]], full[[40, 3, 3, 7]])
    assert torch.equal(view[torch.tensor([1, 70])], full[[1, 70]])
    assert torch.equal(view[::7], full[::7]) and torch.equal(view[:, 2], full[:, 2]) and torch.equal(view[4, 1], full[4, 1])
    with pytest.raises(IndexError, match="out of range"):
        view[len(store)]
    reads = []
    original = h5py.Dataset.__getitem__

    def counting(self, index):
        reads.append(index)
        return original(self, index)

    h5py.Dataset.__getitem__ = counting
    try:
        view[10:12]
    finally:
        h5py.Dataset.__getitem__ = original
    assert reads == [slice(10, 12)]


def test_shuffled_batches_visit_every_row_once_per_epoch_reproducibly(model, tmp_path):
    texts = [f"the cat sat on the mat when mary went {'to the park ' * (i % 5)}" for i in range(60)]
    store = nm.extract(model, texts, HOOKS[:2], tmp_path / "a.h5", progress=False)
    n, hook, other = len(store), "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"

    def epochs(**kwargs):
        seen = []
        for rows, batch in store.batches([hook, other], 50, buffer_rows=128, dtype=torch.float32, with_rows=True, **kwargs):
            assert len(rows) == batch[hook].shape[0] == batch[other].shape[0] <= 50
            assert torch.equal(batch[hook], store[hook][rows].float()) and torch.equal(batch[other], store[other][rows].float())
            seen += rows.tolist()
        return seen

    first = epochs(seed=3, epochs=2)
    assert sorted(first[:n]) == list(range(n)) == sorted(first[n:])
    assert first[:n] != first[n:] and first[:n] != list(range(n))
    assert epochs(seed=3, epochs=2) == first
    assert epochs(seed=4, epochs=1) != first[:n]
    assert epochs(shuffle=False) == list(range(n))
    dropped = list(store.batches(hook, 64, drop_last=True))
    assert [len(b) for b in dropped] == [64] * (n // 64) and dropped[0].dtype == torch.float16
    endless = store.batches(hook, 100, epochs=None)
    assert sum(len(next(endless)) for _ in range(3 * n // 100 + 1)) > 3 * n - 100


def test_an_interrupted_extraction_resumes_with_no_duplicate_and_no_gap(model, tmp_path):
    texts = [f"when mary and john went to the store {i}" for i in range(300)]
    clean = nm.extract(model, texts, HOOKS, tmp_path / "clean.h5", batch_size=4, progress=False)

    def failing():  # documents are read (and tokenised) 256 at a time: the first 256 get stored
        for i, text in enumerate(texts):
            if i == 270:
                raise KeyboardInterrupt
            yield text

    with pytest.raises(KeyboardInterrupt):
        nm.extract(model, failing(), HOOKS, tmp_path / "a.h5", batch_size=4, progress=False)
    partial = nm.open_store(tmp_path / "a.h5")
    assert partial.status == "interrupted" and "interrupted" in repr(partial)
    assert 0 < len(partial) < len(clean) and partial.progress.documents == 256
    assert torch.equal(partial[HOOKS[1]][:], clean[HOOKS[1]][: len(partial)])
    partial.close()
    resumed = nm.extract(model, iter(texts), HOOKS, tmp_path / "a.h5", batch_size=4, progress=False)
    for hook in HOOKS:
        assert torch.equal(resumed[hook][:], clean[hook][:])
    assert torch.equal(resumed.tokens, clean.tokens) and torch.equal(resumed.documents, clean.documents)
    assert not (tmp_path / "a.h5.lock").exists()
    again = nm.extract(model, texts, HOOKS, tmp_path / "a.h5", batch_size=4, progress=False)  # complete: nothing to do
    assert len(again) == len(clean)


def test_other_settings_on_an_existing_store_are_refused_and_leave_it_untouched(model, tmp_path):
    path = tmp_path / "a.h5"
    nm.extract(model, TEXTS, HOOKS[:1], path, progress=False).close()
    before = path.read_bytes()
    cases = [
        (dict(hooks=HOOKS[:2]), "hooks"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(model=nm.load("induction-2l")), "model"),
        (dict(context_length=16), "context_length"),
        (dict(positions="last"), "positions"),
    ]
    for change, named in cases:
        arguments = dict(model=model, inputs=TEXTS, hooks=HOOKS[:1], dtype=torch.float16) | change
        with pytest.raises(StoreError, match=f"{named}: store has .*overwrite=True"):
            nm.extract(arguments.pop("model"), arguments.pop("inputs"), arguments.pop("hooks"), path, progress=False,
                       **arguments)
        assert path.read_bytes() == before
    with pytest.raises(StoreError, match="finished extraction of 7 documents and these inputs hold 3"):
        nm.extract(model, TEXTS[:3], HOOKS[:1], path, progress=False)
    assert path.read_bytes() == before
    replaced = nm.extract(model, TEXTS, HOOKS[1], path, overwrite=True, progress=False)
    assert replaced.hooks == [HOOKS[1]]


def test_other_inputs_of_the_same_shape_are_caught_when_resuming(model, tmp_path):
    path = tmp_path / "a.h5"
    texts = ["the cat sat on the mat"] * 300

    def stop_after(n):
        for i, text in enumerate(texts):
            if i == n:
                raise KeyboardInterrupt
            yield text

    with pytest.raises(KeyboardInterrupt):
        nm.extract(model, stop_after(290), HOOKS[:1], path, batch_size=4, progress=False)
    changed = ["Mary and John"] + texts[1:]
    with pytest.raises(StoreError, match="inputs differ .* row 0"):
        nm.extract(model, iter(changed), HOOKS[:1], path, batch_size=4, progress=False)


def test_bad_inputs_and_paths_are_clear_errors_and_write_nothing(model, tmp_path):
    with pytest.raises(StoreError, match="directory .* does not exist"):
        nm.extract(model, TEXTS, HOOKS, tmp_path / "missing" / "a.h5")
    with pytest.raises(StoreError, match="is a directory"):
        nm.extract(model, TEXTS, HOOKS, tmp_path)
    with pytest.raises(InputError, match="empty"):
        nm.extract(model, [], HOOKS, tmp_path / "a.h5")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty"):
        nm.extract(model, tmp_path / "empty.txt", HOOKS, tmp_path / "a.h5")
    with pytest.raises(InputError, match="does not exist"):
        nm.extract(model, "no such file.txt", HOOKS, tmp_path / "a.h5")
    with pytest.raises(HookNameError, match="did you mean"):
        nm.extract(model, TEXTS, "blocks.0.hook_resid_pots", tmp_path / "a.h5")
    with pytest.raises(StoreError, match="no row per token"):
        nm.extract(model, TEXTS, "blocks.0.attn.hook_pattern", tmp_path / "a.h5")
    with pytest.raises(InputError, match="dtype"):
        nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", dtype=torch.int8)
    with pytest.raises(InputError, match="context"):
        nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", context_length=4096)
    with pytest.raises(InputError, match="positions"):
        nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", positions="first")
    with pytest.raises(InputError, match="document 1 is a int"):
        nm.extract(model, ["fine", 3], HOOKS, tmp_path / "a.h5")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(InputError, match="no field 'text'"):
        nm.extract(model, tmp_path / "bad.jsonl", HOOKS, tmp_path / "b.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt"]  # no store, no lock, no partial


def test_files_that_are_not_stores_are_refused_untouched(model, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    others = other.read_bytes()
    for path, message in ((text, "not an HDF5 file"), (other, "not a NeuronMap activation store")):
        with pytest.raises(StoreError, match=message):
            nm.open_store(path)
    with pytest.raises(StoreError, match="not an HDF5 file.*untouched"):
        nm.extract(model, TEXTS, HOOKS, text, progress=False)
    with pytest.raises(StoreError, match="not a NeuronMap activation store"):
        nm.extract(model, TEXTS, HOOKS, other, progress=False)
    assert text.read_text() == "not hdf5" and other.read_bytes() == others
    with pytest.raises(StoreError, match="no activation store"):
        nm.open_store(tmp_path / "nothing.h5")


def test_a_running_writer_keeps_others_out(model, tmp_path):
    from neuronmap.store.writer import WriterLock

    path = tmp_path / "a.h5"
    with WriterLock(path):
        assert WriterLock.held(path)
        with pytest.raises(StoreError, match="being written by process"):
            nm.extract(model, TEXTS, HOOKS, path, progress=False)
    assert not WriterLock.held(path)


def test_metadata_summary_repr_and_html(model, tmp_path):
    store = nm.extract(model, TEXTS, HOOKS, tmp_path / "a.h5", batch_size=3, context_length=16, compression="gzip",
                       progress=False)
    meta = store.metadata
    assert meta["hooks"] == HOOKS and meta["dtype"] == "float16" and meta["context_length"] == 16
    assert meta["model_name"] == "ioi" and len(meta["model"]["weights_sha256"]) == 64
    assert meta["inputs"] == {"kind": "list", "documents": len(TEXTS)} and meta["neuronmap_version"] == nm.__version__
    assert meta["arguments"]["compression"] == "gzip" and meta["created"].startswith("20")
    with h5py.File(tmp_path / "a.h5") as f:
        assert json.loads(f.attrs["neuronmap"]) == meta
        assert f["activations/blocks.0.hook_resid_post"].compression == "gzip"
        assert f["activations/blocks.0.hook_resid_post"].chunks[1:] == (128,)
    text = repr(store)
    assert "\n" not in text and f"{len(store):,} tokens" in text and "3 hooks" in text and "'ioi'" in text
    page = store._repr_html_()
    assert all(hook in page for hook in HOOKS) and f"{len(store)}×4×32" in page and "7 documents" in page
    assert "<script" not in page


def test_a_hostile_model_name_is_escaped_in_the_summary(tmp_path):
    model = nm.load("ioi", name="<script>alert(1)</script>")
    store = nm.extract(model, TEXTS[:2], HOOKS[:1], tmp_path / "a.h5", progress=False)
    assert "<script>" not in store._repr_html_() and "&lt;script&gt;" in store._repr_html_()


def test_another_family_llama_with_grouped_query_attention(tmp_path):
    from conftest import make_model

    model = nm.load(make_model("llama"))
    stream = torch.randint(0, 28, (3, 9), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_k"]
    store = nm.extract(model, stream, hooks, tmp_path / "l.h5", context_length=5, batch_size=2, progress=False)
    windows = [(d, s, stream[d, s : s + 5].tolist()) for d in range(3) for s in (0, 5)]
    for hook in hooks:
        assert torch.equal(store[hook][:], reference(model, windows, 2, hook))


def test_stop_early_keeps_the_same_captures_and_removes_its_hooks(model):
    names = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]
    full = model.run(TEXTS[:2], capture=names)
    early = model.run(TEXTS[:2], capture=names, stop_early=True)
    assert early.logits is None and full.logits is not None
    assert all(torch.equal(full[n], early[n]) for n in names)
    assert model.list_hooks() == []
    with pytest.raises(InputError, match="needs something to capture"):
        model.run(TEXTS[0], stop_early=True)


def test_cli_extract_summary_and_one_line_errors(tmp_path, capsys):
    from neuronmap.cli import main

    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "c.h5"
    assert main(["extract", "ioi", "--hooks", "blocks.*.hook_resid_post", "--input", str(source), "--out", str(out),
                 "--no-progress", "--context-length", "16", "--positions", "1:"]) == 0
    printed = capsys.readouterr().out
    assert "ActivationStore('c.h5'" in printed and "rows/s" in printed
    store = nm.open_store(out)
    assert store.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] and store.metadata["positions"] == {
        "start": 1, "stop": None, "step": None}
    assert main(["extract", "ioi", "--hooks", "blocks.*.hook_resid_post", "--input", str(source), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().endswith("exists: pass --resume to continue it or --overwrite to replace it")
    assert main(["extract", "ioi", "--hooks", "blocks.0.hook_rezid_post", "--input", str(source), "--out",
                 str(tmp_path / "x.h5")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("neuronmap extract: error: hook name") and "did you mean" in error
    assert main(["extract", "ioi", "--hooks", "blocks.*.hook_resid_post", "--input", str(source), "--out", str(out),
                 "--resume", "--no-progress", "--context-length", "16", "--positions", "1:"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "ioi", "--input", str(source)])
    assert exit_.value.code == 2
    assert not os.path.exists(tmp_path / "x.h5")
