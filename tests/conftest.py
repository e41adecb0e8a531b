"""Small seeded models of every supported family, and a word-level tokenizer, all built offline; and a session in
which Jupyter and IPython keep their files in a temporary folder, never in the user's home."""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

WORDS = ["<pad>", "<unk>", "<s>"] + "the cat sat on mat a dog ran to park when mary and john went store gave drink".split()


JUPYTER_FOLDERS = {
    "JUPYTER_DATA_DIR": "data", "JUPYTER_CONFIG_DIR": "config", "JUPYTER_RUNTIME_DIR": "runtime", "IPYTHONDIR": "ipython",
}


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, restoring what was there (or its absence) afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def jupyter_home():
    """Point Jupyter's data, config and runtime folders and IPython's at a temporary folder for the whole session.

    Kernels, papermill, nbval, nbconvert and the Jupyter servers the tests start inherit the environment, so
    notebook signatures, secrets, kernel connection files and IPython history stay out of the user's home.
    """
    with tempfile.TemporaryDirectory(prefix="neuronmap-jupyter-") as folder:
        folders = {key: os.path.join(folder, name) for key, name in JUPYTER_FOLDERS.items()}
        for path in folders.values():
            os.makedirs(path)
        with environ(folders):
            yield Path(folder)


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS` (ids 0..len(WORDS)-1), padding with id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


FAMILIES = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2", "bert", "roberta"]
PRE_LN = ["gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2"]
ROTARY = ["gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2"]
ENCODERS = ["bert", "roberta"]


def config_for(family: str) -> transformers.PretrainedConfig:
    size = dict(vocab_size=len(WORDS) + 7)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=2, **size)
    if family.startswith("gpt_neox"):
        return transformers.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, use_parallel_residual=family == "gpt_neox", rotary_pct=0.5, **size,
        )
    if family in ("llama", "mistral", "qwen2"):
        config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
        return config_class(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, **size,
        )
    if family in ENCODERS:
        config_class = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        extra = {"max_position_embeddings": 66, "pad_token_id": 1} if family == "roberta" else {"max_position_embeddings": 64}
        return config_class(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, **extra, **size)
    raise ValueError(family)


def make_model(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A seeded random model; weights are scaled up so attention patterns are far from uniform."""
    torch.manual_seed(seed)
    config = config_for(family)
    model_class = transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM
    model = model_class.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                parameter.mul_(8.0)
    return model.eval()


def eager_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def tokens(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(WORDS), (batch, length), generator=generator)


def main_output(output) -> torch.Tensor:
    """Logits when the model has a head, otherwise the last hidden state."""
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def output_projection(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    """The module that maps a layer's per-head results (`hook_z`) back to the residual stream."""
    base = model.base_model
    if family == "gpt2":
        return base.h[layer].attn.c_proj
    if family.startswith("gpt_neox"):
        return base.layers[layer].attention.dense
    if family in ENCODERS:
        return base.encoder.layer[layer].attention.output.dense
    return base.layers[layer].self_attn.o_proj


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def hf_model(family):
    return make_model(family)


def bare(model: torch.nn.Module, *args, **kwargs):
    """The bare HF forward NeuronMap's runs are compared with: no KV cache (one analysis pass needs none)."""
    with torch.no_grad():
        return model(*args, use_cache=False, **kwargs)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by Playwright (the README's test command installs both)."""
    import os

    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page that records script errors and refuses every request that leaves the machine."""
    context = browser.new_context()
    page = context.new_page()
    page.errors = []
    page.external_requests = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))

    def refuse(route):
        page.external_requests.append(route.request.url)
        route.abort()

    page.route(lambda url: not url.startswith(("file:", "data:", "blob:", "about:", "http://127.0.0.1")), refuse)
    yield page
    context.close()


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """The wheel built from this checkout (`pip wheel .`), installed without dependencies into its own folder.

    Run code against it with `PYTHONPATH=<folder>`: `neuronmap` then comes from the wheel, not the source tree.
    """
    root = Path(__file__).resolve().parent.parent
    base = tmp_path_factory.mktemp("wheel")
    wheels, target = base / "wheels", base / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(root)], check=True)
    wheel = next(wheels.glob("neuronmap-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def parameters_cell(notebook: Path) -> str:
    """The source of a report template's papermill `parameters` cell."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if "parameters" in c["metadata"].get("tags", []))["source"])


def declared_parameters(notebook: Path) -> dict[str, object]:
    """A report template's parameters read straight from its `parameters` cell: name → default literal."""
    body = ast.parse(parameters_cell(notebook)).body
    return {node.targets[0].id: ast.literal_eval(node.value) for node in body if isinstance(node, ast.Assign)}


def report_error_line(capsys) -> str:
    """What `neuronmap report` wrote to stderr, checked to be one `neuronmap report: error: ...` line."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("neuronmap report: error: "), err
    return err.strip()
