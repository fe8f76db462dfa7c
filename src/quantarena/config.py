"""The sweep config: the only place where TOML values and CLI strings become typed objects."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from quantarena.errors import ConfigError
from quantarena.methods import METHODS, MethodConfig
from quantarena.models import ModelKind
from quantarena.tasks import TASKS, ReferenceConfig, TaskConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


MAX_LABEL = 120


def _printable(text: str) -> str:
    """Labels are shown in tables, charts, file names and one-line errors: short, and no control characters."""
    if len(text) > MAX_LABEL:
        raise ValueError(f"is {len(text):,} characters; keep it to {MAX_LABEL}")
    if not text or not text.isprintable():
        raise ValueError(f"{text[:40]!r} is empty or holds control characters (newlines, tabs)")
    return text


def _model_name(text: str) -> str:
    if "/" in text or "\\" in text or text in (".", ".."):
        raise ValueError(f"{text!r} must not be a path (no / or \\)")
    return _printable(text)


Label = Annotated[str, AfterValidator(_printable)]
ModelName = Annotated[str, AfterValidator(_model_name)]
# torch.manual_seed takes 64 bits; numpy's generators 0 and up.
Seed = Annotated[int, Field(ge=0, lt=2**63)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class LoraOptions(_Strict):
    r: PositiveInt = 8
    alpha: PositiveFinite = 16
    dropout: NonNegativeFinite = 0.1
    # BERT-family attention projections; other architectures name theirs differently.
    targets: tuple[str, ...] = ("query", "value")
    # QLoRA: train the adapter on a bitsandbytes 4-bit copy of the base (CUDA only).
    quantized_base: Literal["nf4", "fp4"] | None = None


class FinetuneConfig(_Strict):
    """A fine-tuning step (full, or LoRA with ``lora``) before a sequence classifier is quantized."""

    train_dataset: str = "sst2-train"
    eval_dataset: str = "sst2"
    text_column: str | None = None
    label_column: str | None = None
    train_limit: PositiveInt | None = None
    eval_limit: PositiveInt | None = None
    num_labels: PositiveInt = 2
    epochs: PositiveFinite = 1.0
    learning_rate: PositiveFinite = 5e-5
    batch_size: Annotated[int, Field(ge=1, le=1 << 16)] = 32
    max_length: PositiveInt = 128
    warmup_ratio: NonNegativeFinite = 0.06
    lora: LoraOptions | None = None
    seed: Seed = 0


class ModelSpec(_Strict):
    source: str
    name: ModelName | None = None
    gguf_file: str | None = None
    kind: ModelKind | None = None
    num_labels: PositiveInt | None = None
    trust_remote_code: bool = False
    # A sequence classifier whose checkpoint has no classification head is refused (it would score a random
    # head) unless this says the untrained head is meant; the report then says so.
    allow_untrained_head: bool = False
    # Only safetensors are read from model folders; a folder with only pickle weights (pytorch_model.bin) is
    # refused unless this allows torch's weights-only unpickler on it.
    allow_pickle_weights: bool = False


class MethodChoice(_Strict):
    name: str
    label: Label
    config: SerializeAsAny[MethodConfig]


class TaskChoice(_Strict):
    name: str
    label: Label
    config: SerializeAsAny[TaskConfig]


class SweepConfig(_Strict):
    models: tuple[ModelSpec, ...]
    methods: tuple[MethodChoice, ...]
    tasks: tuple[TaskChoice, ...]
    baseline: str
    device: Literal["cpu", "cuda"] = "cpu"
    batch_size: Annotated[int, Field(ge=1, le=1 << 16)] = 8
    output_dir: Path = Path("runs/latest")
    seed: Seed = 0
    data_dir: Path | None = None
    # local: each variant in a fresh child process; inline: in this process; ray: variants as Ray tasks
    # (the executors' registry, checked before the sweep starts).
    executor: str = "local"
    ray_address: str | None = None
    # Local executor: a step of a variant (loading and quantizing it, or one task) running longer is killed
    # and its cell(s) marked failed.
    cell_timeout_s: PositiveFinite | None = None
    # Quantized checkpoints are kept here and reloaded by later sweeps (default $QUANTARENA_CACHE/variants).
    cache_dir: Path | None = None
    cache_variants: bool = True
    # Modules imported before anything else, in every process, so they can register methods and tasks.
    plugins: tuple[str, ...] = ()
    # A fine-tuning step run on every model before the methods (sequence classifiers).
    finetune: FinetuneConfig | None = None

    @model_validator(mode="after")
    def _consistent(self):
        for what, entries in (("method", self.methods), ("task", self.tasks)):
            labels = [e.label for e in entries]
            dupes = sorted({x for x in labels if labels.count(x) > 1})
            if dupes:
                raise ValueError(f"{what} {dupes[0]!r} is listed twice; give one of them a distinct label")
        if self.baseline not in {m.label for m in self.methods}:
            raise ValueError(
                f"baseline {self.baseline!r} is not one of the methods ({', '.join(m.label for m in self.methods)})"
            )
        return self


def _one_line(error: ValidationError, where: str, schema: type[BaseModel]) -> str:
    parts = []
    for err in error.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}; valid keys: {', '.join(schema.model_fields) or 'none'}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{where}: {'; '.join(parts)}"


def validated(schema: type[BaseModel], values: dict[str, Any], where: str):
    try:
        return schema(**values)
    except ValidationError as e:
        raise ConfigError(_one_line(e, where, schema)) from None


def _entries(value: Any, what: str) -> list[dict[str, Any]]:
    """A list of names or tables ``{name = ..., option = ...}`` as dicts with a ``name`` key."""
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what}s: expected a non-empty list of names or tables, got {value!r}")
    entries = []
    for item in value:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{what}s: each entry needs a name, got {item!r}")
        entries.append(dict(entry))
    return entries


def _label(name: str, options: dict[str, Any]) -> str:
    """``name(key=value,...)``; a long one (a dataset path among the options) is cut, with a digest of the
    whole so that labels stay distinct."""
    if not options:
        return name
    label = f"{name}({','.join(f'{k}={v}' for k, v in sorted(options.items()))})"
    label = "".join(ch if ch.isprintable() else " " for ch in label)
    if len(label) <= MAX_LABEL:
        return label
    return f"{label[: MAX_LABEL - 11]}…{hashlib.sha1(label.encode()).hexdigest()[:8]})"


def _as_entry(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {"name": value}


def method_choice(value: MethodChoice | str | dict[str, Any]) -> MethodChoice:
    """A method by name, as a ``{"name": ..., option: ...}`` dict, or already validated."""
    if isinstance(value, MethodChoice):
        return value
    entry = _as_entry(value)
    name = entry.pop("name")
    label = entry.pop("label", None) or _label(name, entry)
    config = validated(METHODS.get(name).config_cls, entry, f"method {label[:MAX_LABEL]}")
    return validated(MethodChoice, {"name": name, "label": label, "config": config}, f"method {label[:40]!r}")


def task_choice(value: TaskChoice | str | dict[str, Any]) -> TaskChoice:
    """A task by name, as a ``{"name": ..., option: ...}`` dict, or already validated."""
    if isinstance(value, TaskChoice):
        return value
    entry = _as_entry(value)
    name = entry.pop("name")
    task = TASKS.get(name)
    label = entry.pop("label", None)
    if label is None and isinstance(entry.get(task.positional), str):
        label = _label(f"{name}:{entry[task.positional]}", {k: v for k, v in entry.items() if k != task.positional})
    label = label or _label(name, entry)
    config = validated(task.Config, entry, f"task {label[:MAX_LABEL]}")
    if isinstance(config, ReferenceConfig):
        reference_choice(config, f"task {label}")
    return validated(TaskChoice, {"name": name, "label": label, "config": config}, f"task {label[:40]!r}")


def reference_choice(config: ReferenceConfig, where: str = "task") -> MethodChoice:
    """The reference method of a comparing task (divergence), checked against the registry."""
    if config.reference_method not in METHODS:
        valid = ", ".join(METHODS.names())
        raise ConfigError(f"{where}: reference_method {config.reference_method!r} is not a method; valid: {valid}")
    method = METHODS.get(config.reference_method)
    options = validated(method.config_cls, config.reference_config, f"{where}: reference_config")
    return MethodChoice(name=method.name, label=method.name, config=options)


def _with_reference(task: TaskChoice, baseline: MethodChoice) -> TaskChoice:
    """Tasks that compare with a reference variant (divergence) take the sweep's baseline unless told otherwise."""
    if not isinstance(task.config, ReferenceConfig) or "reference_method" in task.config.model_fields_set:
        return task
    reference = {"reference_method": baseline.name, "reference_config": baseline.config.model_dump(mode="json")}
    return task.model_copy(update={"config": task.config.model_copy(update=reference)})


def _model_spec(value: Any) -> ModelSpec:
    values = {"source": value} if isinstance(value, str) else value
    if not isinstance(values, dict):
        raise ConfigError(f"models: expected a model path/id or a table, got {value!r}")
    return validated(ModelSpec, values, f"model {values.get('source', '?')}")


def import_plugins(plugins: Any) -> None:
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
    for plugin in plugins:
        try:
            importlib.import_module(plugin)
        except Exception as e:
            raise ConfigError(f"plugin {plugin!r} cannot be imported: {type(e).__name__}: {e}") from None


def sweep_config(raw: dict[str, Any]) -> SweepConfig:
    """Validate a plain dict (parsed TOML, or CLI flags) into a SweepConfig."""
    raw = dict(raw)
    import_plugins(raw.get("plugins", []))
    if "model" in raw:
        if "models" in raw:
            raise ConfigError("give either 'model' or 'models', not both")
        raw["models"] = raw.pop("model")
    for key in ("models", "methods", "tasks"):
        if key not in raw:
            raise ConfigError(f"missing {key!r}: a sweep needs at least one model, method and task")
    models = raw.pop("models")
    models = [_model_spec(m) for m in (models if isinstance(models, list) else [models])]
    if not models:
        raise ConfigError("models: the list is empty")
    methods = [method_choice(e) for e in _entries(raw.pop("methods"), "method")]
    tasks = [task_choice(e) for e in _entries(raw.pop("tasks"), "task")]
    labels = [m.label for m in methods]
    raw.setdefault("baseline", "fp32" if "fp32" in labels else labels[0])
    baseline = next((m for m in methods if m.label == raw["baseline"]), None)
    if baseline is not None:
        tasks = [_with_reference(t, baseline) for t in tasks]
    return validated(SweepConfig, {"models": models, "methods": methods, "tasks": tasks, **raw}, "config")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    return sweep_config({**read_toml(path), **(overrides or {})})
