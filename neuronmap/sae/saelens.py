"""SAELens's folder format (`cfg.json` + `sae_weights.safetensors`), read and written without SAELens installed.

`load_sae` reads what SAELens 6 writes (inference saves, training checkpoints) and the flat `cfg.json` of SAELens
before 6.0, with SAELens's defaults for what an old file leaves out; `save_sae` writes what SAELens's
`SAE.load_from_disk` reads. Tensors are stored as SAELens stores them: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`,
`W_dec [d_sae, d_in]`, `b_dec [d_in]`, and for JumpReLU `threshold [d_sae]`.

BatchTopK: SAELens trains it with one threshold learned alongside (`topk_threshold`) and saves it for inference as a
JumpReLU SAE with that threshold for every latent, decoder norms folded into the weights, and
`metadata.training_architecture = "batchtopk"`. `save_sae` writes a BatchTopK SAE the same way, and `load_sae`
reads such a file (or a training checkpoint, folding its norms as SAELens's inference save does) back as a BatchTopK
SAE, which at inference applies that threshold exactly as SAELens's JumpReLU SAE does.

Anything SAELens writes that NeuronMap does not use (dataset, context size, training settings, ...) is kept in
`SAEConfig.metadata` and written back (a folder's `sparsity.safetensors` and a checkpoint's trainer state are not
read). What would change the arithmetic and NeuronMap does not implement (another architecture, a fine-tuning
scale, whitening kept outside the weights, an unknown field) is an `SAEError` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import SAEError
from .autoencoder import SAE
from .config import ARCHITECTURES, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# what SAELens puts in an SAE's folder besides the two files (sparsity, runner settings, a checkpoint's trainer state)
SAELENS_FILES = {CFG_FILE, WEIGHTS_FILE, "sparsity.safetensors", "runner_cfg.json", "trainer_state.pt",
                 "activations_store_state.safetensors", "activation_scaler.json", "activation_whitening.safetensors"}
# the cfg.json layout `save_sae` writes is SAELens 6's; SAELens reads a file without a version >= 6 as an old one
FORMAT_VERSION = "6.0.0"

# SAELens architectures NeuronMap does not implement (its registry in 6.54)
UNSUPPORTED = ("gated", "abstopk", "matryoshka_batchtopk", "transcoder", "skip_transcoder", "jumprelu_transcoder",
               "jumprelu_skip_transcoder", "temporal", "matching_pursuit")
# top-level fields that set the arithmetic, as SAELens names them (all map onto SAEConfig)
_MATH = ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
         "reshape_activations", "k", "rescale_acts_by_decoder_norm")
# SAELens's training-only fields (a training checkpoint writes them at top level too): kept, never used
_TRAINING = {"decoder_init_norm", "l1_coefficient", "lp_norm", "l1_warm_up_steps", "use_sparse_activations",
             "aux_loss_coefficient", "topk_threshold_lr", "jumprelu_init_threshold", "jumprelu_bandwidth",
             "jumprelu_sparsity_loss_mode", "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient",
             "jumprelu_tanh_scale", "jumprelu_ste_to_input", "target_l0"}
# what SAELens's loader moves from an old flat cfg.json into `metadata` (and accepts at top level)
_LLM_METADATA = {"model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                 "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                 "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                 "hook_head_index_out", "hf_hook_name", "hf_hook_name_out"}
_PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                  "activation_fn_str": "activation_fn"}


def load_sae(path: str | Path, device: str | torch.device | None = None) -> SAE:
    """The SAE in a folder SAELens wrote (or `save_sae` wrote), on `device` (default CPU), in eval mode."""
    folder = _sae_folder(path)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    raw = _read_json(cfg_path)
    fields, file_architecture = _fields_from_saelens(raw, cfg_path)
    try:
        cfg = SAEConfig(**fields)
    except SAEError as error:
        raise SAEError(f"{cfg_path}: {error}") from None
    state = _state_from_saelens(_read_tensors(weights_path), cfg, file_architecture, weights_path)
    if file_architecture == "batchtopk" and cfg.rescale_acts_by_decoder_norm:
        _fold_decoder_norms(state)  # as SAELens's inference save does: the same SAE, its decoder rows unit norm
        cfg = cfg.replace(rescale_acts_by_decoder_norm=False)
    with torch.device("meta"):  # no random initialisation to throw away (an SAE can be gigabytes)
        sae = SAE(cfg)
    sae.load_state_dict(state, strict=True, assign=True)
    return sae.to(device or "cpu").eval()


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `sae` as SAELens writes it (`cfg.json` + `sae_weights.safetensors`) into the folder `path`.

    The folder is written under a temporary name beside it and renamed into place, so it is never half-written; an
    existing SAE folder is replaced whole, and a folder holding anything else is refused.
    """
    cfg_dict, tensors = _to_saelens(sae)
    try:
        text = json.dumps(cfg_dict, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise SAEError(f"the SAE's metadata cannot be written as JSON ({error}); keep it to JSON values") from None
    folder = Path(path)
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_file(tensors, str(partial / WEIGHTS_FILE))
        (partial / CFG_FILE).write_text(text + "\n")
        mask = _umask()
        for name in (WEIGHTS_FILE, CFG_FILE):
            _fsync(partial / name)
            os.chmod(partial / name, 0o666 & ~mask)  # (the temporary folder and safetensors' file start private)
        os.chmod(partial, 0o777 & ~mask)
        _move_into_place(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- reading --------------------------------------------------------------------------------------------------------


def _sae_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise SAEError(f"no SAE at {folder}: the folder does not exist")
    if not folder.is_dir():
        raise SAEError(f"{folder} is a file; an SAE is a folder holding {CFG_FILE} and {WEIGHTS_FILE} "
                       f"(as SAELens writes)")
    missing = [name for name in (CFG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise SAEError(f"{folder} is not an SAE folder: it has no {' and no '.join(missing)} (SAELens writes "
                       f"{CFG_FILE} and {WEIGHTS_FILE})")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SAEError(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(raw, dict):
        raise SAEError(f"{path} holds a JSON {type(raw).__name__}, not the object of an SAE's settings")
    return raw


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SAEError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from None


def _fields_from_saelens(raw: dict[str, Any], where: Path) -> tuple[dict[str, Any], str]:
    """SAEConfig's fields from a cfg.json, and the architecture the file names (which says how its tensors look)."""
    if _major_version(raw) < 6:
        raw = _from_pre_6(raw, where)
    missing = [name for name in ("architecture", "d_in", "d_sae") if name not in raw]
    if missing:
        raise SAEError(f"{where} lacks the required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    architecture = _architecture(raw["architecture"], where)
    if not isinstance(raw.get("metadata") or {}, dict):
        raise SAEError(f"{where}: metadata must be a JSON object, got {type(raw['metadata']).__name__}")
    metadata = dict(raw.get("metadata") or {})
    details = metadata.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    unknown = sorted(set(raw) - set(_MATH) - {"device", "metadata"} - _TRAINING - _LLM_METADATA - set(details))
    if unknown:
        raise SAEError(f"{where} has field{'s' if len(unknown) > 1 else ''} NeuronMap does not know: "
                       f"{', '.join(unknown)} (they may change how the SAE computes; NeuronMap reads "
                       f"{', '.join(_MATH)})")
    for name in sorted((set(raw) & (_TRAINING | _LLM_METADATA)) - set(details)):
        metadata.setdefault(name, raw[name])  # old training checkpoints: keep their settings where a save keeps them
    _check_normalization(raw.get("normalize_activations", "none"), where)
    fields: dict[str, Any] = {
        "architecture": architecture,
        "d_in": raw["d_in"],
        "d_sae": raw["d_sae"],
        "dtype": str(raw.get("dtype", "float32")).removeprefix("torch."),
        "apply_b_dec_to_input": _bool(raw, "apply_b_dec_to_input", True, where),
        "normalize_activations": raw.get("normalize_activations", "none"),
        "reshape_activations": raw.get("reshape_activations", "none"),
        "hook_name": metadata.pop("hook_name", None),
        "model_name": metadata.pop("model_name", None),
        "metadata": metadata,
    }
    if architecture in ("topk", "batchtopk"):
        if "k" not in raw:
            raise SAEError(f"{where} lacks the required field k (a {architecture} SAE's number of active latents)")
        fields["k"] = _whole(raw["k"], where)
        fields["rescale_acts_by_decoder_norm"] = _bool(raw, "rescale_acts_by_decoder_norm", False, where)
    elif architecture == "jumprelu" and metadata.get("training_architecture") == "batchtopk":
        k = details.get("k")
        if isinstance(k, (int, float)) and not isinstance(k, bool) and float(k).is_integer():
            fields.update(architecture="batchtopk", k=int(k))  # its inference is this JumpReLU; k trains it further
    return fields, architecture


def _from_pre_6(raw: dict[str, Any], where: Path) -> dict[str, Any]:
    """An old flat cfg.json (SAELens < 6) in SAELens 6's shape, with the defaults SAELens's own loader gives it."""
    raw = {_PRE_6_RENAMES.get(key, key): value for key, value in raw.items()}
    activation = raw.pop("activation_fn", None) or "relu"
    kwargs = raw.pop("activation_fn_kwargs", None) or {}
    raw.pop("finetuning_scaling_factor", None)  # its tensor decides (see _state_from_saelens)
    out: dict[str, Any] = {"architecture": raw.pop("architecture", "standard")}
    if activation == "topk":
        if not isinstance(kwargs, dict) or "k" not in kwargs:
            raise SAEError(f"{where}: a topk activation_fn needs activation_fn_kwargs with k, got {kwargs!r}")
        out.update(architecture="topk", k=kwargs["k"])
    elif activation != "relu":
        raise SAEError(f"{where}: activation_fn {activation!r} is not supported (NeuronMap reads 'relu' and 'topk')")
    normalize = raw.pop("normalize_activations", None)
    if isinstance(normalize, bool):  # SAELens's old flag: True meant the expected-average-norm scale
        normalize = "expected_average_only_in" if normalize else "none"
    out["normalize_activations"] = normalize or "none"
    hook_name = raw.get("hook_name") or ""
    out["reshape_activations"] = raw.pop("reshape_activations", "hook_z" if "hook_z" in str(hook_name) else "none")
    for name in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k", "rescale_acts_by_decoder_norm"):
        if name in raw:
            out[name] = raw.pop(name)
    raw.pop("device", None)
    raw.setdefault("prepend_bos", True)  # SAELens's default for old files
    out["metadata"] = raw  # everything else: model, hook, dataset, training settings
    return out


def _state_from_saelens(tensors: dict[str, torch.Tensor], cfg: SAEConfig, file_architecture: str,
                        where: Path) -> dict[str, torch.Tensor]:
    """The SAE's parameters from the file's tensors, named and shaped as the cfg says, in the cfg's dtype."""
    tensors = dict(tensors)
    scale = tensors.pop("scaling_factor", None)  # SAELens < 6's fine-tuning scale; all ones means none
    if scale is not None and not torch.all(scale == 1):
        raise SAEError(f"{where} holds a fine-tuning scaling_factor that is not all ones; NeuronMap does not support "
                       f"SAELens's finetuning_scaling_factor")
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU training checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").to(getattr(torch, cfg.dtype)).exp()
    if file_architecture == "batchtopk" and "topk_threshold" in tensors:  # a training checkpoint's one threshold
        tensors["threshold"] = tensors.pop("topk_threshold").double().expand(cfg.d_sae)
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
              "b_dec": (cfg.d_in,)}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (cfg.d_sae,)
    missing, extra = [n for n in shapes if n not in tensors], sorted(set(tensors) - set(shapes))
    if missing or extra:
        parts = [f"lacks {', '.join(missing)}"] if missing else []
        parts += [f"has tensors a {file_architecture} SAE does not: {', '.join(extra)}"] if extra else []
        raise SAEError(f"{where} {' and '.join(parts)} (a {file_architecture} SAE stores {', '.join(shapes)})")
    dtype = getattr(torch, cfg.dtype)
    state = {}
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise SAEError(f"{where}: {name} has shape {list(tensor.shape)}, but d_in={cfg.d_in} and "
                           f"d_sae={cfg.d_sae} in {CFG_FILE} make it {list(shape)}")
        if not tensor.is_floating_point():
            raise SAEError(f"{where}: {name} holds {tensor.dtype} values, not floating point")
        state[name] = tensor.to(dtype).contiguous()
    return state


def _architecture(name: Any, where: Path) -> str:
    if name in ARCHITECTURES:
        return name
    supported = ", ".join(ARCHITECTURES)
    if name in UNSUPPORTED:
        raise SAEError(f"{where}: SAELens's {name!r} architecture is not supported (NeuronMap reads {supported})")
    raise SAEError(f"{where}: unknown SAE architecture {name!r} (NeuronMap reads {supported})")


def _check_normalization(value: Any, where: Path) -> None:
    if value == "covariance_whitening":
        raise SAEError(f"{where}: normalize_activations 'covariance_whitening' is not supported: its whitening lives "
                       f"outside the weights (SAELens folds it into them when training ends; load the final SAE)")


def _major_version(raw: dict[str, Any]) -> int:
    """SAELens's version that wrote the file (0 when it says none: SAELens reads those as old files too)."""
    metadata = raw.get("metadata")
    version = raw.get("sae_lens_version") or (metadata.get("sae_lens_version") if isinstance(metadata, dict) else None)
    match = re.match(r"\s*v?(\d+)", str(version or ""))
    return int(match.group(1)) if match else 0


def _bool(raw: dict[str, Any], name: str, default: bool, where: Path) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise SAEError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _whole(value: Any, where: Path) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise SAEError(f"{where}: k={value} is not a whole number of latents")
    return value  # SAEConfig checks the rest


def _fold_decoder_norms(state: dict[str, torch.Tensor]) -> None:
    """Unit-norm decoder rows with the encoder scaled to match: what an SAE that ranks latents by
    `pre · ‖W_dec row‖` computes, with no rescaling left to do (SAELens's fold, norms clamped at 1e-8 as there)."""
    norm = state["W_dec"].norm(dim=-1).clamp(min=1e-8)
    state["W_enc"] = state["W_enc"] * norm
    state["b_enc"] = state["b_enc"] * norm
    state["W_dec"] = state["W_dec"] / norm[:, None]


# --- writing --------------------------------------------------------------------------------------------------------


def _to_saelens(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The cfg.json and tensors SAELens's inference SAE of this architecture reads."""
    if not isinstance(sae, SAE):
        raise SAEError(f"save_sae writes a neuronmap SAE, got {type(sae).__name__}")
    cfg = sae.cfg
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    names += ["threshold"] if cfg.architecture in ("jumprelu", "batchtopk") else []
    tensors = {name: getattr(sae, name).detach().to("cpu").clone().contiguous() for name in names}
    if cfg.reshape_activations == "hook_z" and cfg.hook_name is not None and not cfg.hook_name.endswith("_z"):
        raise SAEError(f"reshape_activations 'hook_z' on hook {cfg.hook_name!r}: SAELens reads it only for a hook "
                       f"named '..._z'")
    metadata = {**cfg.metadata, "model_name": cfg.model_name, "hook_name": cfg.hook_name}
    if _major_version({"metadata": metadata}) < 6:
        metadata["sae_lens_version"] = FORMAT_VERSION
    out: dict[str, Any] = {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": str(sae.W_enc.device),
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations,
    }
    if cfg.architecture == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=cfg.rescale_acts_by_decoder_norm)
    elif cfg.architecture == "batchtopk":  # as SAELens saves it for inference: a JumpReLU SAE with its threshold
        out["architecture"] = "jumprelu"
        if cfg.rescale_acts_by_decoder_norm:
            _fold_decoder_norms(tensors)
        details = dict(metadata.get("training_architecture_details") or {})
        details["k"] = cfg.k
        details.setdefault("rescale_acts_by_decoder_norm", cfg.rescale_acts_by_decoder_norm)
        metadata.update(training_architecture="batchtopk", training_architecture_details=details)
    out["metadata"] = metadata
    return out, tensors


def _check_target(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise SAEError(f"cannot save an SAE to {folder}: it is a file (an SAE is a folder)")
    if folder.is_dir():
        present = {entry.name for entry in folder.iterdir()}
        foreign = sorted(present - SAELENS_FILES)
        if present and (foreign or CFG_FILE not in present):
            why = f"no {CFG_FILE}"
            if foreign:
                why = f"it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}"
            raise SAEError(f"will not overwrite {folder}: it is not an SAE folder ({why}); choose a new or empty "
                           f"folder")


def _move_into_place(partial: Path, folder: Path) -> None:
    """Rename the finished folder onto `folder`; an SAE folder already there is replaced whole."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    if not folder.exists():
        os.rename(partial, folder)
        return
    old = partial.with_suffix(".old")
    os.rename(folder, old)
    try:
        os.rename(partial, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())
