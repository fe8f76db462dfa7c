"""WikiText-2 as lm-evaluation-harness's ``wikitext`` task, beside the sliding-window token perplexity.

Documents are the ``wikitext_document_level`` split: the raw test file cut at every top-level heading
(`` = Title = ``). Each document is detokenized (lm-eval's ``wikitext_detokenizer``) and scored whole with
lm-eval's rolling windows: disjoint windows of ``max_length`` tokens, the first conditioned on the prefix
token (BOS, else EOS), each later one on the token before it (the last, partial one on as many earlier
tokens as fill its window). Then, with the words and UTF-8 bytes counted on the document *before*
detokenization (as lm-eval does):

* ``word_perplexity = exp(-sum log-likelihood / sum words)``
* ``byte_perplexity = exp(-sum log-likelihood / sum bytes)``
* ``bits_per_byte = -sum log-likelihood / sum bytes / ln 2``

``token_perplexity`` is the perplexity task's recipe (rows joined by blank lines, windows of
``window_length`` every ``stride`` tokens); ``sliding_window = false`` leaves it out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydantic import PositiveInt, model_validator

from quantarena.data import corpus, read_records, read_text, require_columns
from quantarena.errors import ConfigError, DataError
from quantarena.models import ResolvedModel
from quantarena.tasks import loglik, scoring
from quantarena.tasks.base import EvalContext, Task, TaskOutput, register
from quantarena.tasks.perplexity import PerplexityConfig, sliding_window_perplexity


class WikitextConfig(scoring.LogLikelihoodConfig):
    dataset: str = "wikitext2-raw"
    sliding_window: bool = True
    window_dataset: str = "wikitext2"
    window_length: PositiveInt = 1024
    stride: PositiveInt = 512
    window_max_tokens: PositiveInt | None = None

    @model_validator(mode="after")
    def _stride_within_window(self):
        if self.stride > self.window_length:
            raise ValueError(f"stride ({self.stride}) must be <= window_length ({self.window_length})")
        return self

    def window_config(self) -> PerplexityConfig:
        return PerplexityConfig(
            dataset=self.window_dataset,
            split=self.split,
            max_length=self.window_length,
            stride=self.stride,
            max_tokens=self.window_max_tokens,
        )


@dataclass(frozen=True)
class Document:
    page: str  # as in wikitext_document_level: counted for words and bytes
    text: str  # detokenized: what is scored


@dataclass(frozen=True)
class WikitextData:
    documents: list[Document]
    corpus: str | None  # the sliding-window recipe's text


def documents(raw: str) -> list[str]:
    """The ``wikitext_document_level`` split of a raw WikiText file: a new page at each `` = Title = `` line."""
    pages, lines = [], []
    for line in raw.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def detokenize(page: str) -> str:
    """lm-eval's ``wikitext_detokenizer``: undo WikiText's tokenization spaces."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(spaced, joined)
    for mark in ":;.!?,":
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for spaced, joined in (
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ):
        s = s.replace(spaced, joined)
    return s


def rolling_requests(tokens: list[int], prefix_token: int, max_length: int) -> list[loglik.Request]:
    """lm-eval's ``get_rolling_token_windows(context_len=1)`` made disjoint (``make_disjoint_window``)."""
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    requests = [loglik.Request((prefix_token,), tuple(tokens[:first]))]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        requests.append(loglik.Request(tuple(tokens[end - max_length - 1 : end - n]), tuple(tokens[end - n : end])))
        predicted = end
    return requests


@register
class Wikitext(Task):
    name = "wikitext"
    description = "WikiText-2 documents (lm-eval): word/byte perplexity, bits per byte; plus sliding-window tokens"
    model_kind = "causal-lm"
    Config = WikitextConfig
    quality_metric = "word_perplexity"
    higher_is_better = False
    latency_metric = "ms_per_token"

    def load(self) -> WikitextData:
        cfg = self.config
        if cfg.dataset.endswith((".jsonl", ".jsonl.gz")) or cfg.dataset.startswith("hf:"):
            # A document-level dataset (e.g. hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1): a page column.
            records = read_records(cfg.dataset, self.data_dir, cfg.split)
            require_columns(records, ["page"], cfg.dataset)
            pages = [r["page"] for r in records]
        else:
            pages = documents(read_text(cfg.dataset, self.data_dir))
        if not pages:
            raise DataError(f"dataset {cfg.dataset}: no documents")
        text = None
        if cfg.sliding_window:
            window = cfg.window_config()
            text = corpus(window.dataset, self.data_dir, window.split, window.text_column)
        return WikitextData([Document(p, detokenize(p)) for p in cfg.select(pages)], text)

    def check(self, data: WikitextData, model: ResolvedModel) -> None:
        super().check(data, model)
        context = model.context_length
        if context and "window_length" in self.config.model_fields_set and self.config.window_length > context:
            raise ConfigError(
                f"task {self.name}: window_length {self.config.window_length} exceeds the {context} positions "
                f"{model.name} can represent; set window_length <= {context}"
            )

    def evaluate(self, ctx: EvalContext, data: WikitextData) -> TaskOutput:
        limit, prefix = scoring.max_length(ctx, self.config), loglik.prefix_token_id(ctx.tokenizer)
        owners, requests = [], []
        for d, doc in enumerate(data.documents):
            windows = rolling_requests(list(ctx.tokenizer(doc.text).input_ids), prefix, limit)
            owners += [d] * len(windows)
            requests += windows
        run = scoring.score(ctx, requests, self.config)
        doc_logprob = [0.0] * len(data.documents)
        for d, s in zip(owners, run.scored.scores, strict=True):
            doc_logprob[d] += s.logprob
        words = [len(re.split(r"\s+", doc.page)) for doc in data.documents]
        nbytes = [len(doc.page.encode("utf-8")) for doc in data.documents]
        ll, n_tokens = sum(doc_logprob), sum(len(r.continuation) for r in requests)
        metrics = {
            "word_perplexity": math.exp(-ll / sum(words)),
            "byte_perplexity": math.exp(-ll / sum(nbytes)),
            "bits_per_byte": -ll / sum(nbytes) / math.log(2),
            "n_documents": len(data.documents),
            "n_words": sum(words),
            "n_bytes": sum(nbytes),
            "n_tokens": n_tokens,
            "tokens_per_s": n_tokens / run.seconds,
            "ms_per_token": run.seconds / n_tokens * 1000,
        } | run.metrics(len(data.documents))
        per_example = {"doc_logprob": doc_logprob, "doc_words": words, "doc_bytes": nbytes}
        if data.corpus is not None:
            window = sliding_window_perplexity(ctx, data.corpus, self.config.window_config())
            metrics["token_perplexity"] = window.metrics.pop("perplexity")
            metrics |= {f"window_{k}": v for k, v in window.metrics.items()}
            per_example |= window.per_example
        return TaskOutput(metrics, per_example)
