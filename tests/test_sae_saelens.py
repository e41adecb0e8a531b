"""SAELens's folder format: files SAELens itself writes load in NeuronMap and encode/decode as SAELens does, files
NeuronMap writes load in SAELens and encode/decode as NeuronMap does, and every bad file or target is an SAEError
naming the problem.

SAELens (a dev dependency, never a runtime one) runs in one subprocess for the module (tests/saelens_reference.py),
so the test process never imports it or TransformerLens.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuronmap.errors import SAEError
from neuronmap.sae import SAE
from neuronmap.sae import saelens as saelens_format

D_IN, D_SAE = 16, 64
TOLERANCE = 1e-5
META = {"model_name": "gpt2", "hook_name": "blocks.1.hook_resid_post", "context_size": 128, "dataset_path": "toy/set"}
HOOK_Z = {"model_name": "gpt2", "hook_name": "blocks.0.attn.hook_z"}

# What SAELens writes, one case each: (name, architecture, config, how it is saved, input, seed)
SAELENS_CASES = [
    dict(name="standard", architecture="standard", cfg=dict(apply_b_dec_to_input=False), save="inference"),
    dict(name="standard_constant_norm", architecture="standard",
         cfg=dict(normalize_activations="constant_norm_rescale"), save="inference"),
    dict(name="standard_layer_norm", architecture="standard", cfg=dict(normalize_activations="layer_norm"),
         save="inference"),
    dict(name="standard_hook_z", architecture="standard", cfg=dict(reshape_activations="hook_z"), save="inference",
         metadata=HOOK_Z, input="z"),
    dict(name="topk", architecture="topk", cfg=dict(k=8), save="inference"),
    dict(name="topk_checkpoint_rescaled", architecture="topk", cfg=dict(k=8, rescale_acts_by_decoder_norm=True,
         normalize_activations="layer_norm"), save="training"),
    dict(name="topk_plain", architecture="topk", cfg=dict(k=5, rescale_acts_by_decoder_norm=False,
         apply_b_dec_to_input=False), save="inference"),
    dict(name="jumprelu", architecture="jumprelu", cfg=dict(), save="inference"),
    dict(name="jumprelu_checkpoint", architecture="jumprelu", cfg=dict(normalize_activations="constant_norm_rescale"),
         save="training"),
    dict(name="jumprelu_log_threshold", architecture="jumprelu", cfg=dict(), save="log_threshold"),
    dict(name="batchtopk", architecture="batchtopk", cfg=dict(k=6), save="inference"),
    dict(name="batchtopk_plain", architecture="batchtopk", cfg=dict(k=6, rescale_acts_by_decoder_norm=False,
         apply_b_dec_to_input=False), save="inference"),
    dict(name="batchtopk_checkpoint", architecture="batchtopk", cfg=dict(k=6), save="training"),
    dict(name="pre6_standard", architecture="standard", cfg=dict(), save="cfg_json", cfg_json={
        "model_name": "gpt2-small", "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
        "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu",
        "l1_coefficient": 8e-05, "lr": 0.0004, "context_size": 128, "normalize_activations": False,
        "b_dec_init_method": "geometric_median", "expansion_factor": 4, "run_name": "old"}),
    dict(name="pre6_topk", architecture="topk", cfg=dict(k=7, rescale_acts_by_decoder_norm=False), save="cfg_json",
         cfg_json={"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 7},
                   "model_name": "pythia-70m", "hook_name": "blocks.2.hook_resid_post", "hook_head_index": None,
                   "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
                   "finetuning_scaling_factor": False, "normalize_activations": "none", "context_size": 256,
                   "sae_lens_training_version": "4.3.0", "neuronpedia_id": None}),
]
for _i, _case in enumerate(SAELENS_CASES):
    _case["cfg"] = dict(d_in=D_IN, d_sae=D_SAE, **_case["cfg"])
    _case.setdefault("metadata", META)
    _case.setdefault("input", "x")
    _case["seed"] = 100 + _i

# What NeuronMap writes (random weights like the SAELens cases'); reference: SAELens loading the folder
NEURONMAP_CASES = {
    "nm_standard": dict(architecture="standard", apply_b_dec_to_input=False),
    "nm_standard_layer_norm": dict(architecture="standard", normalize_activations="layer_norm"),
    "nm_standard_hook_z": dict(architecture="standard", reshape_activations="hook_z", hook_name=HOOK_Z["hook_name"]),
    "nm_topk_rescaled": dict(architecture="topk", k=8, rescale_acts_by_decoder_norm=True,
                             normalize_activations="constant_norm_rescale"),
    "nm_topk": dict(architecture="topk", k=5),
    "nm_jumprelu": dict(architecture="jumprelu", apply_b_dec_to_input=False),
    "nm_batchtopk": dict(architecture="batchtopk", k=6),
    "nm_batchtopk_rescaled": dict(architecture="batchtopk", k=6, rescale_acts_by_decoder_norm=True,
                                  normalize_activations="layer_norm"),
}
# SAELens-written cases that NeuronMap loads and saves again; SAELens must read the copy as it read the original
RESAVED = ["topk_checkpoint_rescaled", "jumprelu_log_threshold", "batchtopk", "batchtopk_checkpoint", "pre6_topk",
           "standard_hook_z"]


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, D_IN, generator=g) * 1.5 + 0.2
    return {"x": x, "z": x.reshape(3, 5, 4, 4).clone()}


@torch.no_grad()
def randomize(sae: SAE, seed: int) -> SAE:
    """Decoder rows of unequal norms, nonzero biases, thresholds some pre-activations pass and some do not."""
    g = torch.Generator().manual_seed(seed)
    sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / math.sqrt(D_IN))
    sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
    norms = torch.empty(D_SAE, 1).uniform_(0.3, 2.0, generator=g)
    sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN) * norms)
    sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 1.2, generator=g))
    return sae


def neuronmap_sae(name: str) -> SAE:
    fields = dict(NEURONMAP_CASES[name])
    fields.setdefault("hook_name", META["hook_name"])
    return randomize(SAE(d_in=D_IN, d_sae=D_SAE, model_name="gpt2", metadata={"note": name}, **fields),
                     seed=sorted(NEURONMAP_CASES).index(name))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """SAELens writes its cases; NeuronMap writes its own and re-saves some of SAELens's; SAELens reads those back.
    One subprocess for all of it (phase 1, "ready", phase 2 on the list sent to its stdin)."""
    root = tmp_path_factory.mktemp("saelens")
    save_file(inputs(), str(root / "inputs.safetensors"))
    (root / "cases.json").write_text(json.dumps(SAELENS_CASES))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).with_name("saelens_reference.py")
    with open(root / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(script), str(root)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        try:
            line = "start"
            while line and line.strip() != "ready":  # (anything SAELens prints on import comes first)
                line = process.stdout.readline()
            if not line:
                process.kill()
                process.wait()
                pytest.fail(f"SAELens's reference script failed:\n{(root / 'stderr.txt').read_text()[-4000:]}")
            folders = []
            for name in NEURONMAP_CASES:
                neuronmap_sae(name).save(root / "neuronmap" / name)
                folders.append(dict(name=name, folder=str(root / "neuronmap" / name), input=case_input(name)))
            for name in RESAVED:
                SAE.load(root / "saelens" / name).save(root / "resaved" / name)
                folders.append(dict(name=f"resaved_{name}", folder=str(root / "resaved" / name),
                                    input=case_input(name)))
            process.communicate(json.dumps(folders) + "\n", timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if process.returncode != 0:
        pytest.fail(f"SAELens's reference script failed:\n{(root / 'stderr.txt').read_text()[-4000:]}")
    return root


def case_input(name: str) -> str:
    if name in NEURONMAP_CASES:
        return "z" if NEURONMAP_CASES[name].get("reshape_activations") == "hook_z" else "x"
    return next(case["input"] for case in SAELENS_CASES if case["name"] == name)


def reference(work: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(work / "out" / f"{name}.safetensors")), json.loads((work / "out" / f"{name}.json").read_text())


@torch.no_grad()
def encode_decode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = sae.encode(x)
    return acts, sae.decode(acts)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    theirs = theirs.reshape(ours.shape)  # SAELens gives hook_z reconstructions back as [..., head, d_head]
    assert (ours - theirs).abs().max().item() <= TOLERANCE


# --- files SAELens writes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SAELENS_CASES, ids=[case["name"] for case in SAELENS_CASES])
def test_saelens_files_encode_and_decode_as_saelens_does(work, case):
    sae = SAE.load(work / "saelens" / case["name"])
    out, _ = reference(work, case["name"])
    acts, recons = encode_decode(sae, inputs()[case["input"]])
    assert (out["acts"] > 0).any() and (out["acts"] == 0).any()  # the input exercises the activation
    assert_close(acts, out["acts"])
    assert_close(recons, out["recons"])


@pytest.mark.parametrize("case", SAELENS_CASES, ids=[case["name"] for case in SAELENS_CASES])
def test_saelens_fields_map_onto_the_config(work, case):
    cfg = SAE.load(work / "saelens" / case["name"]).cfg
    _, theirs = reference(work, case["name"])
    theirs = theirs["cfg"]
    skip = {"model_name", "hook_name"}
    if case["save"] == "cfg_json":  # what SAELens fills in for an old file that has none
        skip |= {"sae_lens_version", "sae_lens_training_version", "neuronpedia_id"}
    metadata = {key: value for key, value in theirs["metadata"].items() if key not in skip}
    expected_architecture = "batchtopk" if case["architecture"] == "batchtopk" else theirs["architecture"]
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.dtype) == (expected_architecture, D_IN, D_SAE, "float32")
    assert cfg.apply_b_dec_to_input == theirs["apply_b_dec_to_input"]
    assert cfg.normalize_activations == theirs["normalize_activations"]
    assert cfg.reshape_activations == theirs["reshape_activations"]
    assert cfg.k == case["cfg"].get("k")
    assert cfg.hook_name == theirs["metadata"]["hook_name"] and cfg.model_name == theirs["metadata"]["model_name"]
    for key, value in metadata.items():  # SAELens's metadata (and an old file's other fields) kept
        assert cfg.metadata[key] == value, key


def test_old_flat_files_keep_their_other_fields(work):
    metadata = SAE.load(work / "saelens" / "pre6_standard").cfg.metadata
    assert metadata["l1_coefficient"] == 8e-05 and metadata["run_name"] == "old" and metadata["hook_point_layer"] == 0
    assert metadata["hook_head_index"] is None  # SAELens's name for hook_point_head_index


def test_a_batchtopk_file_is_a_jumprelu_file_with_one_threshold(work):
    raw = json.loads((work / "saelens" / "batchtopk" / "cfg.json").read_text())
    sae = SAE.load(work / "saelens" / "batchtopk")
    assert raw["architecture"] == "jumprelu" and raw["metadata"]["training_architecture"] == "batchtopk"
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.6))
    assert not sae.cfg.rescale_acts_by_decoder_norm  # SAELens folded the decoder norms into the weights
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


# --- files NeuronMap writes -------------------------------------------------------------------------------------


SAELENS_CLASS = {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}


@pytest.mark.parametrize("name", list(NEURONMAP_CASES))
def test_neuronmap_files_encode_and_decode_in_saelens_as_in_neuronmap(work, name):
    out, theirs = reference(work, name)
    acts, recons = encode_decode(neuronmap_sae(name), inputs()[case_input(name)])
    assert theirs["class"] == SAELENS_CLASS[NEURONMAP_CASES[name]["architecture"]]
    assert (acts > 0).any() and (acts == 0).any()
    assert_close(acts, out["acts"])
    assert_close(recons, out["recons"])


@torch.no_grad()
def test_a_rescaled_batchtopk_sae_is_written_folded_as_saelens_writes_it(work):
    """Its inference by hand: rank by pre-activation × decoder norm against the threshold, decode as if the decoder
    rows had unit norm; SAELens's JumpReLU SAE reading the folded file computes exactly that."""
    sae = neuronmap_sae("nm_batchtopk_rescaled")
    out, theirs = reference(work, "nm_batchtopk_rescaled")
    x = inputs()["x"]
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    pre = ((x - mu) / (std + 1e-5) - sae.b_dec) @ sae.W_enc + sae.b_enc
    norm = sae.W_dec.norm(dim=-1)
    scaled = pre * norm
    acts = scaled * (scaled > sae.threshold)
    recons = ((acts / norm) @ sae.W_dec + sae.b_dec) * std + mu
    assert theirs["class"] == "JumpReLUSAE"
    assert (acts > 0).any() and (acts == 0).any()
    assert_close(acts, out["acts"])
    assert_close(recons, out["recons"])
    again = SAE.load(work / "neuronmap" / "nm_batchtopk_rescaled")
    assert again.cfg.architecture == "batchtopk" and again.cfg.k == 6 and not again.cfg.rescale_acts_by_decoder_norm
    assert_close(encode_decode(again, x)[0], acts)


@pytest.mark.parametrize("name", RESAVED)
def test_saelens_files_saved_again_by_neuronmap_read_the_same_in_saelens(work, name):
    original, original_cfg = reference(work, name)
    copy, copy_cfg = reference(work, f"resaved_{name}")
    assert_close(copy["acts"], original["acts"])
    assert_close(copy["recons"], original["recons"])
    if not name.startswith("pre6"):  # (an old flat file comes back in SAELens 6's layout)
        assert copy_cfg["cfg"]["metadata"] == original_cfg["cfg"]["metadata"]


@pytest.mark.parametrize("name", list(NEURONMAP_CASES))
def test_neuronmap_round_trip_keeps_everything(tmp_path, name):
    sae = neuronmap_sae(name)
    again = SAE.load(sae.save(tmp_path / "sae"))
    x = inputs()[case_input(name)]
    if sae.cfg.architecture == "batchtopk" and sae.cfg.rescale_acts_by_decoder_norm:
        assert again.cfg.rescale_acts_by_decoder_norm is False  # written folded (as SAELens writes BatchTopK)
        assert again.cfg.replace(rescale_acts_by_decoder_norm=True, metadata={}) == sae.cfg.replace(metadata={})
        assert again.cfg.metadata["note"] == name
        return
    assert again.cfg.replace(metadata={}) == sae.cfg.replace(metadata={})
    written = {"training_architecture": "batchtopk",  # what SAELens's inference save of a BatchTopK SAE records
               "training_architecture_details": {"k": 6, "rescale_acts_by_decoder_norm": False}}
    expected = sae.cfg.metadata | (written if sae.cfg.architecture == "batchtopk" else {})
    assert {k: v for k, v in again.cfg.metadata.items() if k != "sae_lens_version"} == expected
    for key, value in sae.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(encode_decode(again, x)[1], encode_decode(sae, x)[1])


def test_load_puts_the_sae_on_the_device_in_the_cfg_dtype(tmp_path):
    sae = randomize(SAE("jumprelu", D_IN, D_SAE, dtype="float64"), seed=3)
    again = SAE.load(sae.save(tmp_path / "sae"), device="cpu")
    assert again.W_enc.dtype == torch.float64 and again.W_enc.device.type == "cpu" and not again.training
    assert torch.equal(again.threshold, sae.threshold)


# --- bad files --------------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    """A good JumpReLU SAE folder to spoil."""
    return randomize(SAE("jumprelu", D_IN, D_SAE, hook_name=META["hook_name"]), seed=1).save(tmp_path / "sae")


def edit_cfg(folder: Path, change) -> None:
    raw = json.loads((folder / "cfg.json").read_text())
    change(raw)
    (folder / "cfg.json").write_text(json.dumps(raw))


def edit_weights(folder: Path, change) -> None:
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(SAEError, match="does not exist"):
        SAE.load(tmp_path / "nowhere")


def test_a_file_is_not_an_sae_folder(folder):
    with pytest.raises(SAEError, match="is a file"):
        SAE.load(folder / "cfg.json")


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_a_missing_file_is_named(folder, missing):
    (folder / missing).unlink()
    with pytest.raises(SAEError, match=f"no {missing}"):
        SAE.load(folder)


def test_cfg_json_that_is_not_json(folder):
    (folder / "cfg.json").write_text('{"d_in": 16, "d_sae":')
    with pytest.raises(SAEError, match="cfg.json cannot be read as JSON"):
        SAE.load(folder)


def test_cfg_json_that_is_not_an_object(folder):
    (folder / "cfg.json").write_text("[16, 64]")
    with pytest.raises(SAEError, match="holds a JSON list"):
        SAE.load(folder)


def test_missing_required_fields_are_all_named(folder):
    edit_cfg(folder, lambda raw: (raw.pop("d_in"), raw.pop("d_sae")))
    with pytest.raises(SAEError, match="lacks the required fields d_in, d_sae"):
        SAE.load(folder)


def test_a_new_file_without_architecture(folder):
    edit_cfg(folder, lambda raw: raw.pop("architecture"))
    with pytest.raises(SAEError, match="required field architecture"):
        SAE.load(folder)


def test_a_topk_file_without_k(tmp_path):
    folder = randomize(SAE("topk", D_IN, D_SAE, k=4), seed=2).save(tmp_path / "sae")
    edit_cfg(folder, lambda raw: raw.pop("k"))
    with pytest.raises(SAEError, match="required field k"):
        SAE.load(folder)


def test_an_unknown_architecture_is_named_with_the_supported_ones(folder):
    edit_cfg(folder, lambda raw: raw.update(architecture="spiking"))
    with pytest.raises(SAEError, match="unknown SAE architecture 'spiking' .*standard, topk, batchtopk, jumprelu"):
        SAE.load(folder)


@pytest.mark.parametrize("architecture", ["gated", "matryoshka_batchtopk", "transcoder", "jumprelu_skip_transcoder"])
def test_saelens_architectures_neuronmap_lacks_are_not_supported(folder, architecture):
    edit_cfg(folder, lambda raw: raw.update(architecture=architecture))
    with pytest.raises(SAEError, match=f"'{architecture}' architecture is not supported"):
        SAE.load(folder)


def test_whitening_kept_outside_the_weights_is_not_supported(folder):
    edit_cfg(folder, lambda raw: raw.update(normalize_activations="covariance_whitening"))
    with pytest.raises(SAEError, match="'covariance_whitening' is not supported"):
        SAE.load(folder)


def test_an_unknown_normalization_is_named(folder):
    edit_cfg(folder, lambda raw: raw.update(normalize_activations="batch_norm"))
    with pytest.raises(SAEError, match="normalize_activations 'batch_norm' is not one of"):
        SAE.load(folder)


def test_an_unknown_field_that_may_change_the_arithmetic_is_named(folder):
    edit_cfg(folder, lambda raw: raw.update(d_out=16, output_scale=2.0))
    with pytest.raises(SAEError, match="does not know: d_out, output_scale"):
        SAE.load(folder)


def test_an_old_activation_function_neuronmap_lacks(folder):
    def old(raw):
        raw.pop("architecture"), raw["metadata"].pop("sae_lens_version")
        raw["activation_fn_str"] = "tanh-relu"
    edit_cfg(folder, old)
    with pytest.raises(SAEError, match="activation_fn 'tanh-relu' is not supported"):
        SAE.load(folder)


def test_a_fine_tuning_scale_is_not_supported_unless_all_ones(folder):
    edit_weights(folder, lambda t: t.update(scaling_factor=torch.ones(D_SAE)))
    assert SAE.load(folder).cfg.architecture == "jumprelu"  # all ones: no scale, as SAELens reads it
    edit_weights(folder, lambda t: t.update(scaling_factor=torch.full((D_SAE,), 2.0)))
    with pytest.raises(SAEError, match="scaling_factor that is not all ones"):
        SAE.load(folder)


@pytest.mark.parametrize("cut", ["data", "header", "empty"])
def test_a_truncated_weights_file_is_named(folder, cut):
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    path.write_bytes({"data": data[:-100], "header": data[:30], "empty": b""}[cut])
    with pytest.raises(SAEError, match="sae_weights.safetensors is not a readable safetensors file"):
        SAE.load(folder)


def test_a_corrupted_weights_header_is_named(folder):
    path = folder / "sae_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12  # the JSON header no longer parses
    path.write_bytes(bytes(data))
    with pytest.raises(SAEError, match="sae_weights.safetensors is not a readable safetensors file"):
        SAE.load(folder)


def test_a_missing_tensor_is_named(folder):
    edit_weights(folder, lambda t: t.pop("threshold"))
    with pytest.raises(SAEError, match="lacks threshold"):
        SAE.load(folder)


def test_an_unexpected_tensor_is_named(folder):
    edit_weights(folder, lambda t: t.update(b_gate=torch.zeros(D_SAE)))
    with pytest.raises(SAEError, match="has tensors a jumprelu SAE does not: b_gate"):
        SAE.load(folder)


def test_a_tensor_shape_that_does_not_match_the_cfg_is_named(folder):
    edit_weights(folder, lambda t: t.update(W_enc=t["W_enc"].T.contiguous()))
    with pytest.raises(SAEError, match=r"W_enc has shape \[64, 16\], but d_in=16 and d_sae=64 .* make it \[16, 64\]"):
        SAE.load(folder)


def test_a_cfg_whose_widths_do_not_match_the_tensors(folder):
    edit_cfg(folder, lambda raw: raw.update(d_sae=32))
    with pytest.raises(SAEError, match=r"W_enc has shape \[16, 64\], but d_in=16 and d_sae=32"):
        SAE.load(folder)


def test_integer_tensors_are_not_weights(folder):
    edit_weights(folder, lambda t: t.update(b_dec=torch.zeros(D_IN, dtype=torch.int64)))
    with pytest.raises(SAEError, match="b_dec holds torch.int64 values"):
        SAE.load(folder)


def test_a_field_of_the_wrong_type_is_named(folder):
    edit_cfg(folder, lambda raw: raw.update(apply_b_dec_to_input="yes"))
    with pytest.raises(SAEError, match="apply_b_dec_to_input must be true or false"):
        SAE.load(folder)


# --- saving -------------------------------------------------------------------------------------------------------


def test_saving_refuses_a_folder_that_is_not_an_sae(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(SAEError, match="will not overwrite .*notes: it is not an SAE folder \\(it holds thesis.tex\\)"):
        SAE("standard", D_IN, D_SAE).save(target)
    assert [p.name for p in target.iterdir()] == ["thesis.tex"] and (target / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_saving_refuses_a_file(tmp_path):
    (tmp_path / "sae").write_text("x")
    with pytest.raises(SAEError, match="it is a file"):
        SAE("standard", D_IN, D_SAE).save(tmp_path / "sae")


def test_saving_over_an_sae_folder_replaces_it_whole(tmp_path):
    first = randomize(SAE("jumprelu", D_IN, D_SAE), seed=4)
    folder = first.save(tmp_path / "sae")
    (folder / "sparsity.safetensors").write_bytes(b"stale")
    second = randomize(SAE("topk", D_IN, D_SAE, k=3), seed=5)
    assert second.save(folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert torch.equal(SAE.load(folder).W_dec, second.W_dec)


def test_saving_into_an_empty_folder(tmp_path):
    (tmp_path / "sae").mkdir()
    SAE("standard", D_IN, D_SAE, seed=0).save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    old = randomize(SAE("jumprelu", D_IN, D_SAE), seed=6)
    folder = old.save(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_write(tensors, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(saelens_format, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        SAE("standard", D_IN, D_SAE).save(folder)
    with pytest.raises(OSError, match="disk full"):
        SAE("standard", D_IN, D_SAE).save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_metadata_that_is_not_json_is_refused_before_anything_is_written(tmp_path):
    sae = SAE("standard", D_IN, D_SAE, metadata={"tensor": torch.zeros(2)})
    with pytest.raises(SAEError, match="metadata cannot be written as JSON"):
        sae.save(tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_a_decoder_norm_rescale_saelens_has_no_field_for_is_refused():
    for architecture in ("standard", "jumprelu"):
        with pytest.raises(SAEError, match=f"only applies to topk and batchtopk SAEs, not '{architecture}'"):
            SAE(architecture, D_IN, D_SAE, rescale_acts_by_decoder_norm=True)
