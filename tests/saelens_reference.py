"""SAELens's side of tests/test_sae_saelens.py, run in a subprocess so that importing SAELens (and TransformerLens)
never touches the test process: `python tests/saelens_reference.py WORKDIR`.

Phase 1 reads WORKDIR/cases.json and WORKDIR/inputs.safetensors; for each case it builds a SAELens training SAE with
seeded random weights, writes it as SAELens writes it (inference save, training checkpoint, or an older layout made
from one) into WORKDIR/saelens/<name>, and writes SAELens's own encode/decode of the case's input to
WORKDIR/out/<name>.safetensors. It then prints "ready" and waits for one line on stdin: a JSON list of folders
NeuronMap wrote ({"name", "folder", "input"}), which phase 2 loads with `SAE.load_from_disk` and encodes/decodes the
same way (WORKDIR/out/<name>.safetensors, and SAELens's view of each config in WORKDIR/out/<name>.json).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lens import SAE, TrainingSAE
from sae_lens.registry import get_sae_training_class


def main(workdir: Path) -> None:
    inputs = load_file(str(workdir / "inputs.safetensors"))
    (workdir / "out").mkdir(exist_ok=True)
    for case in json.loads((workdir / "cases.json").read_text()):
        reference = write_case(case, workdir / "saelens")
        record(reference, inputs[case["input"]], workdir / "out" / case["name"])
    print("ready", flush=True)
    for item in json.loads(sys.stdin.readline()):
        sae = SAE.load_from_disk(item["folder"])
        record(sae, inputs[item["input"]], workdir / "out" / item["name"])


def write_case(case: dict, root: Path):
    """Write the case's SAE as SAELens does and return the SAELens SAE whose outputs are the reference."""
    sae_class, cfg_class = get_sae_training_class(case["architecture"])
    cfg = cfg_class(**case["cfg"])
    for key, value in case.get("metadata", {}).items():
        cfg.metadata[key] = value
    sae = sae_class(cfg)
    randomize(sae, case["seed"])
    folder = root / case["name"]
    save = case["save"]
    if save == "inference":
        sae.save_inference_model(folder)
        return SAE.load_from_disk(folder)
    sae.save_model(folder)  # a training checkpoint
    if save == "training":
        if case["architecture"] == "batchtopk":  # SAELens reads this only as a training SAE: use its inference save
            sae.save_inference_model(root / f"{case['name']}.inference")
            return SAE.load_from_disk(root / f"{case['name']}.inference")
        return SAE.load_from_disk(folder)
    if save == "log_threshold":  # the layout of older JumpReLU checkpoints, read by SAELens's training SAE
        weights = load_file(str(folder / "sae_weights.safetensors"))
        weights["log_threshold"] = weights.pop("threshold").log()
        save_file(weights, str(folder / "sae_weights.safetensors"))
        return TrainingSAE.load_from_disk(folder)
    if save == "cfg_json":  # the same weights under a hand-written cfg.json (an older SAELens's flat layout)
        (folder / "cfg.json").write_text(json.dumps(case["cfg_json"]))
        return SAE.load_from_disk(folder)
    raise ValueError(f"unknown save {save!r}")


@torch.no_grad()
def randomize(sae, seed: int) -> None:
    """Weights that exercise every convention: decoder rows of unequal norms, nonzero biases, thresholds that some
    pre-activations pass and some do not."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
    sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.2)
    norms = torch.empty(d_sae, 1).uniform_(0.3, 2.0, generator=g)
    sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in) * norms)
    sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.3)
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(torch.empty(d_sae).uniform_(0.05, 1.2, generator=g))
    if hasattr(sae, "topk_threshold"):
        sae.topk_threshold = torch.tensor(0.6, dtype=torch.double)


@torch.no_grad()
def record(sae, x: torch.Tensor, stem: Path) -> None:
    sae.eval()
    acts = sae.encode(x)
    recons = sae.decode(acts)
    save_file({"acts": acts.contiguous(), "recons": recons.contiguous()}, str(stem.with_suffix(".safetensors")))
    cfg = sae.cfg.to_dict()
    stem.with_suffix(".json").write_text(json.dumps({"class": type(sae).__name__, "cfg": cfg}, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
