"""Any lm-evaluation-harness task or group, by name, answered by quantarena's scorer.

lm-eval does everything but the model's answers: its TaskManager finds the task (the installed YAMLs and
``include_path`` folders), builds the documents, prompts and requests, and computes its own metrics and
aggregation. The answers come from ``lm_eval_model``: lm-eval's own HF model class with its
``loglikelihood`` and ``loglikelihood_rolling`` requests (after its own tokenization) sent to the scorer of
the built-in tasks (packed rows, shared contexts, logits only where scored); ``generate_until`` is lm-eval's.
So a result is lm-eval's for any task, computed faster.

lm-eval's TaskManager parses every installed YAML when built (about 14 s on a 2-core machine); the index of
the installed tasks is kept as JSON in quantarena's cache, keyed by lm-eval's version and files, and read
back in under a second. The index of ``include_path`` folders is built every time (they are small).

A task folder is code as well as data, and nothing a user hands over runs unless they say so: YAMLs of an
``include_path`` that name Python (``!function``, a ``class``) are refused unless ``trust_code = true``, and
every prompt template is rendered in Jinja's sandbox (lm-eval's own environment would let a template reach
Python's internals, ``{{ cycler.__init__.__globals__ }}``), here and for the installed tasks alike.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from quantarena.environment import package_version
from quantarena.errors import ConfigError, DataError, first_line
from quantarena.measure import timed
from quantarena.models import cache_dir
from quantarena.tasks import loglik
from quantarena.tasks.base import EvalContext, Task, TaskConfig, TaskOutput, register

INDEX_FORMAT = 1


class LmEvalConfig(TaskConfig):
    task: str = Field(min_length=1)  # an lm-eval task or group name
    include_path: tuple[str, ...] = ()  # folders of task YAMLs, as lm-eval's --include_path
    num_fewshot: NonNegativeInt | None = None  # default: the task's own
    # The headline metric, as lm-eval names it ("acc", "exact_match,strict-match"); default: the task's first.
    metric: str | None = None
    max_length: PositiveInt | None = None  # default as lm-eval: the model's context
    bootstrap_iters: NonNegativeInt = 100000  # lm-eval's default, for the stderr of non-mean metrics
    trust_code: bool = False  # run the Python that include_path YAMLs name (!function, class)

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_folder(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _no_random_sample(self):
        if self.limit_seed is not None:
            raise ValueError("limit_seed is not supported by lm-eval tasks; limit takes each task's first documents")
        return self


def _encode_entry(entry: Any) -> list:
    return [entry.name, entry.kind.name, entry.yaml_path and str(entry.yaml_path), entry.cfg, sorted(entry.tags)]


def _decode_index(encoded: dict[str, list]) -> dict[str, Any]:
    from lm_eval.tasks._index import Entry, Kind

    return {
        key: Entry(name, Kind[kind], Path(path) if path else None, cfg, set(tags))
        for key, (name, kind, path, cfg, tags) in encoded.items()
    }


def _installed_index(build: Callable[..., dict[str, Any]], root: Path) -> dict[str, Any]:
    """lm-eval's index of its installed tasks, from the cache when the same version and files built it."""
    files = sorted(root.glob("**/*.yaml"))
    signature = [
        INDEX_FORMAT,
        package_version("lm_eval"),
        str(root),
        len(files),
        max(p.stat().st_mtime_ns for p in files),
    ]
    path = cache_dir() / "lm-eval-index" / f"{hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:24]}.json"
    try:
        return _decode_index(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    index = build([root])
    encoded = {k: _encode_entry(e) for k, e in index.items()}
    try:
        text = json.dumps(encoded)
        if _decode_index(json.loads(text)) == index:  # only an exact round trip is kept
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    except (OSError, TypeError, ValueError):
        pass  # not cached: the next run builds it again
    return index


CODE = re.compile(r"!function|^\s*class\s*:", re.MULTILINE)


def _code_in(folder: Path) -> str | None:
    """The first YAML of ``folder`` that names Python, as "file: line"."""
    for path in sorted(folder.glob("**/*.yaml")):
        text = path.read_text(errors="replace")
        found = CODE.search(text)
        if found:
            line = text[text.rfind("\n", 0, found.start()) + 1 :].splitlines()[0].strip()
            return f"{path.relative_to(folder)}: {line}"
    return None


@contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval's prompt templates rendered in Jinja's immutable sandbox, with lm-eval's filters."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils

    env = ImmutableSandboxedEnvironment(
        loader=utils.env.loader, undefined=utils.env.undefined, keep_trailing_newline=utils.env.keep_trailing_newline
    )
    env.filters.update(utils.env.filters)
    with mock.patch.object(utils, "env", env):
        yield


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = ()) -> Any:
    """lm-eval's TaskManager over its installed tasks and ``include_path``, the installed index from the cache."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager, _index

    for folder in include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"lm-eval include_path {folder!r} is not a folder")
    installed, build = Path(lm_eval.tasks.__file__).parent, _index.TaskIndex.build

    def cached_build(paths, **options):
        index: dict[str, Any] = {}
        for root in paths:  # later roots override earlier ones, as in lm-eval
            index |= _installed_index(build, root) if Path(root) == installed and not options else build([root])
        return index

    with mock.patch.object(_index.TaskIndex, "build", staticmethod(cached_build)):
        return TaskManager(include_path=list(include_path) or None)


@functools.cache
def _model_class() -> type:
    from lm_eval import utils
    from lm_eval.models.huggingface import HFLM

    class ScoredHFLM(HFLM):
        """lm-eval's HF model, its log-likelihoods computed by quantarena's scorer."""

        def __init__(self, model, tokenizer, *, batch_size: int, max_length: int | None, progress):
            logging.getLogger(HFLM.__module__).disabled = True  # the warning that a model object was passed
            try:
                super().__init__(
                    pretrained=model,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    max_length=max_length,
                    # lm-eval's own choice (BOS, else EOS), and CLS for tokenizers with neither.
                    prefix_token_id=loglik.prefix_token_id(tokenizer),
                )
            finally:
                logging.getLogger(HFLM.__module__).disabled = False
            self.progress = progress
            self.n_forwards = self.n_tokens_forwarded = 0

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            scored = loglik.score(
                self.model,
                [loglik.Request(tuple(context), tuple(continuation)) for _, context, continuation in requests],
                batch_size=self.batch_size,
                max_length=self.max_length,
                device=self.device,
                progress=self.progress,
            )
            self.n_forwards += scored.n_forwards
            self.n_tokens_forwarded += scored.n_tokens_forwarded
            answers = [(s.logprob, s.greedy) for s in scored.scores]
            for (key, _, _), answer in zip(requests, answers, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return answers

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """lm-eval's disjoint rolling windows, every window of every text scored in one call."""
            windows, owners = [], []
            for i, (text,) in enumerate(r.args for r in requests):
                for context, continuation in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                ):
                    windows.append((None, context, continuation))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
                totals[i] += logprob
            for request, total in zip(requests, totals, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

    return ScoredHFLM


def lm_eval_model(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """A loaded (quantized or not) transformers causal LM as an lm-eval ``LM``, for ``lm_eval.simple_evaluate``:
    lm-eval's HF model with its log-likelihoods computed by quantarena's scorer."""
    return _model_class()(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)


@dataclass
class Suite:
    """An lm-eval task or group as built: what is evaluated (its fingerprint, per task) and the built objects."""

    name: str
    fingerprints: dict[str, str]  # per task: digest of its config, evaluated documents and few-shot pool
    built: Any = field(default=None, metadata={"digest": False})
    manager: Any = field(default=None, metadata={"digest": False})


def _rows(docs: Any, limit: int | None) -> list | None:
    if docs is None:
        return None
    n = len(docs) if limit is None else min(limit, len(docs))
    return docs.select(range(n)).to_list() if hasattr(docs, "select") else list(docs)[:n]


def _fingerprint(task: Any, limit: int | None) -> str:
    try:
        pool = task.fewshot_docs()
    except Exception:  # a task without a few-shot source: its prompts cannot depend on one
        pool = None
    value = {
        "lm_eval": package_version("lm_eval"),
        "config": task.dump_config(),
        "docs": _rows(task.eval_docs, limit),
        "fewshot": _rows(pool, None),
    }
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _flat(result: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's "metric,filter" keys as "metric" for the unfiltered ones; "N/A" as None."""
    return {
        key.removesuffix(",none"): None if value == "N/A" else value
        for key, value in result.items()
        if key not in ("alias", "name", "sample_len", "sample_count")
    }


def _doc_scores(out: dict, leaves: list[str], metrics: dict[str, Any]) -> dict[str, list[float]]:
    """Per-document values of the mean-aggregated metrics, across the suite's tasks in order, kept only where
    their mean is the reported value (a group that averages its tasks' means unweighted is not such a mean)."""
    samples = [s for leaf in leaves for s in sorted(out["samples"].get(leaf, []), key=lambda s: s["doc_id"])]
    scores = {}
    for key, value in metrics.items():
        metric, _, flt = key.partition(",")
        if not isinstance(value, (int, float)) or "stderr" in metric:
            continue
        values = [s.get(metric) for s in samples if s.get("filter", "none") == (flt or "none")]
        if values and all(isinstance(v, (int, float)) for v in values):  # bools too: 0/1 correctness
            floats = [float(v) for v in values]
            if math.isclose(sum(floats) / len(floats), value, rel_tol=1e-9, abs_tol=1e-12):
                scores[key] = floats
    return scores


@register
class LmEval(Task):
    name = "lm-eval"
    description = "any lm-evaluation-harness task or group by name (lm-eval:NAME), lm-eval's prompts and metrics"
    model_kind = "causal-lm"
    Config = LmEvalConfig
    quality_metric = "acc"
    higher_is_better = True
    latency_metric = "ms_per_example"
    positional: ClassVar[str] = "task"

    def load(self) -> Suite:
        cfg = self.config
        for folder in cfg.include_path:
            code = _code_in(Path(folder)) if Path(folder).is_dir() and not cfg.trust_code else None
            if code:
                raise ConfigError(
                    f"lm-eval include_path {folder}: {code} runs Python from that folder; "
                    "set trust_code = true if you trust it"
                )
        manager = task_manager(tuple(str(Path(p).resolve()) for p in cfg.include_path))
        if cfg.task not in manager.all_tasks:
            close = difflib.get_close_matches(cfg.task, manager.all_tasks, n=5)
            hint = f"; close: {', '.join(close)}" if close else "; see `lm_eval ls tasks`"
            raise ConfigError(f"lm-eval has no task or group {cfg.task!r}{hint}")
        if cfg.task in manager.all_tags:
            raise ConfigError(f"lm-eval's {cfg.task!r} is a tag, not a task or group; name one of its tasks")
        try:
            with sandboxed_templates():
                loaded = manager.load([cfg.task])
            built = loaded["groups"].get(cfg.task) or loaded["tasks"][cfg.task]
            fingerprints = {name: _fingerprint(task, cfg.limit) for name, task in loaded["tasks"].items()}
        except Exception as e:
            raise DataError(
                f"lm-eval task {cfg.task}: {type(e).__name__}: {first_line(e, 'could not be built')}"
            ) from None
        return Suite(cfg.task, fingerprints, built, manager)

    def evaluate(self, ctx: EvalContext, data: Suite) -> TaskOutput:
        from lm_eval import simple_evaluate

        cfg = self.config
        lm = lm_eval_model(
            ctx.model, ctx.tokenizer, batch_size=ctx.batch_size, max_length=cfg.max_length, progress=ctx.progress
        )
        with timed(ctx.device) as watch, sandboxed_templates():
            out = simple_evaluate(
                model=lm,
                tasks=[data.built],
                task_manager=data.manager,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                bootstrap_iters=cfg.bootstrap_iters,
                log_samples=True,
            )
        reported = _flat(out["results"][data.name])
        metrics = dict(reported)
        headline = cfg.metric or next((k for k in metrics if "stderr" not in k), None)
        if headline not in metrics:
            raise DataError(f"lm-eval task {data.name} has no metric {headline!r}; it has {', '.join(metrics)}")
        leaves = list(data.fingerprints)
        n = sum(out["n-samples"][leaf]["effective"] for leaf in leaves)
        if data.name not in leaves:
            metrics["subtasks"] = {
                name: _flat(out["results"][name]) | {"n": out["n-samples"].get(name, {}).get("effective")}
                for name in out["results"]
                if name != data.name
            }
        metrics |= {
            "n_examples": n,
            "inference_s": watch.seconds,
            "examples_per_s": n / watch.seconds,
            "ms_per_example": watch.seconds / n * 1000,
            "n_forwards": lm.n_forwards,
            "n_tokens_forwarded": lm.n_tokens_forwarded,
            "lm_eval_version": package_version("lm_eval"),
        }
        better = out.get("higher_is_better", {}).get(data.name, {}).get(headline.partition(",")[0], True)
        scores = _doc_scores(out, leaves, reported)
        per_example = {"doc_scores": scores} if scores else {}
        return TaskOutput(metrics, per_example, quality_metric=headline, higher_is_better=bool(better))
