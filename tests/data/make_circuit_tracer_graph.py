"""Write `circuit_tracer_graph.json`: an attribution graph written by circuit-tracer itself, the reference that
`neuronmap.circuits.read_attribution_graph` is tested against.

The file is made by circuit-tracer's own writer, `circuit_tracer.utils.create_graph_files` (which prunes the graph
with its own `prune_graph` and serialises it through its pydantic `Model` / `Node` / `Metadata`), so the schema is
the peer's, not ours. What it is fed is a small hand-built `circuit_tracer.Graph`: no model hub can be reached
here, so instead of attributing a pretrained model through its transcoders, the adjacency matrix is a seeded random
one with the shape and sparsity pattern `attribute` produces (features receive from tokens, errors and features of
lower layers at the same or earlier positions; logits receive from the last position; errors and tokens receive
nothing), over a tiny 3-layer config whose tokenizer is a word-level one saved to a temporary folder. The prompt
starts with "<bos>", so the file carries text that must be escaped when shown.

Generated with circuit-tracer 0.5.0 from PyPI (its writer differs from github.com/decoderesearch/circuit-tracer at
commit 4bb8c0ea10bde09727e14565ec8469656880da53 only in import order) and torch 2.13.0, with OMP_NUM_THREADS=1; the
output is deterministic. To regenerate, from the repository root:

    python3 -m venv .tracer-venv
    .tracer-venv/bin/pip install -c constraints.txt torch==2.13.0 circuit-tracer==0.5.0
    .tracer-venv/bin/python tests/data/make_circuit_tracer_graph.py

(never into the development .venv: circuit-tracer pins its own transformers and TransformerLens).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.graph import Graph
from circuit_tracer.utils.create_graph_files import create_graph_files
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

OUT = Path(__file__).with_name("circuit_tracer_graph.json")
SLUG = "neuronmap-fixture"
VOCAB = ["<bos>", "The", " cat", " sat", " on", " the", " mat", " floor", " rug", " dog"]
PROMPT = ["<bos>", "The", " cat", " sat", " on", " the"]
LOGITS = [(" mat", 0.55), (" floor", 0.2), (" rug", 0.1)]
N_LAYERS, D_TRANSCODER, N_FEATURES = 3, 64, 40


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer_dir = Path(folder) / "tokenizer"
        _tokenizer().save_pretrained(tokenizer_dir)
        graph = _graph(str(tokenizer_dir))
        out_dir = Path(folder) / "out"
        create_graph_files(graph, slug=SLUG, output_path=str(out_dir), scan="tiny-random-clt",
                           node_threshold=0.8, edge_threshold=0.98)
        shutil.copyfile(out_dir / f"{SLUG}.json", OUT)
    print(f"wrote {OUT}")


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<bos>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")


def _graph(tokenizer_name: str) -> Graph:
    n_pos, n_logits = len(PROMPT), len(LOGITS)
    layers = torch.randint(0, N_LAYERS, (N_FEATURES,))
    positions = torch.randint(1, n_pos, (N_FEATURES,))
    positions[-8:] = n_pos - 1  # some features at the last position, where the logits read
    # distinct feature indices, none below N_LAYERS: circuit-tracer names an error node "0_{layer}_{pos}", the same
    # id as feature {layer} of layer 0 at that position, and real graphs never hold one feature twice
    features = torch.randperm(D_TRANSCODER - N_LAYERS)[:N_FEATURES] + N_LAYERS
    order = torch.argsort(layers * n_pos + positions, stable=True)
    active = torch.stack([layers[order], positions[order], features[order]], dim=1)

    # node order: [features, errors (layer-major, then position), tokens, logits]; rows are targets
    n_errors = N_LAYERS * n_pos
    layer_of = torch.cat([active[:, 0].float(), torch.arange(N_LAYERS).repeat_interleave(n_pos).float(),
                          torch.full((n_pos,), -1.0), torch.full((n_logits,), float(N_LAYERS))])
    pos_of = torch.cat([active[:, 1], torch.arange(n_pos).repeat(N_LAYERS), torch.arange(n_pos),
                        torch.full((n_logits,), n_pos - 1)])
    n = len(layer_of)
    allowed = (layer_of[None, :] < layer_of[:, None]) & (pos_of[None, :] <= pos_of[:, None])
    receives = torch.zeros(n, dtype=torch.bool)
    receives[:N_FEATURES] = True
    receives[-n_logits:] = True
    allowed &= receives[:, None]
    allowed[-n_logits:] &= (pos_of == n_pos - 1)[None, :]  # logits read the residual at the last position
    allowed[:, -n_logits:] = False  # logits send nothing
    weights = torch.randn(n, n) * (torch.rand(n, n) < 0.6)
    # attention moves information across positions: stronger edges there, weaker ones from errors, so that more
    # than the last position survives circuit-tracer's pruning
    weights *= 1 + 3 * (pos_of[None, :] < pos_of[:, None])
    weights[:, N_FEATURES:N_FEATURES + n_errors] *= 0.3
    adjacency = torch.where(allowed, weights, torch.zeros(()))

    vocab = {word: i for i, word in enumerate(VOCAB)}
    cfg = UnifiedConfig(n_layers=N_LAYERS, d_model=16, d_head=4, n_heads=4, d_mlp=D_TRANSCODER, d_vocab=len(VOCAB),
                        tokenizer_name=tokenizer_name, model_name="tiny-random", original_architecture="GPT2LMHeadModel")
    assert adjacency.shape == (N_FEATURES + n_errors + n_pos + n_logits,) * 2
    return Graph(
        input_string="".join(PROMPT),
        input_tokens=torch.tensor([vocab[word] for word in PROMPT]),
        active_features=active,
        adjacency_matrix=adjacency,
        cfg=cfg,
        selected_features=torch.arange(N_FEATURES),
        activation_values=torch.rand(N_FEATURES) * 5,
        logit_targets=[LogitTarget(token_str=word, vocab_idx=vocab[word]) for word, _ in LOGITS],
        logit_probabilities=torch.tensor([p for _, p in LOGITS]),
        scan="tiny-random-clt",
    )


if __name__ == "__main__":
    main()
