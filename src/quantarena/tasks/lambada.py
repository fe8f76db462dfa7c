"""LAMBADA (OpenAI's version): predict a passage's last word.

Two accuracies are reported, since both are in use:

* ``acc`` and ``perplexity``, as lm-evaluation-harness's ``lambada_openai``: the context is the text up to
  its last space, the target ``" " + last word``; ``acc`` is whether every target token is the greedy one,
  ``perplexity`` is ``exp(-mean log-likelihood of the target)`` over passages (its stderr here is the delta
  method's, ``perplexity x stderr of the mean log-likelihood``; lm-eval bootstraps it).
* ``last_token_acc``, as the quanto benchmark: the passage tokenized whole, its last token predicted from
  the others. When the target's tokens end the whole passage's tokens (nearly always), that prediction is
  already in the target's scoring and costs nothing; otherwise it is scored as its own request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantarena.data import read_records, require_columns
from quantarena.errors import DataError
from quantarena.metrics import accuracy_stderr
from quantarena.tasks import loglik, scoring
from quantarena.tasks.base import EvalContext, Task, TaskOutput, register


class LambadaConfig(scoring.LogLikelihoodConfig):
    dataset: str = "lambada"
    text_column: str = "text"


@dataclass(frozen=True)
class Passage:
    context: str
    target: str
    text: str


def split_last_word(text: str) -> Passage:
    """lm-eval's doc_to_text / doc_to_target: split on single spaces."""
    words = text.split(" ")
    return Passage(" ".join(words[:-1]), " " + words[-1], text)


@register
class Lambada(Task):
    name = "lambada"
    description = "LAMBADA last word: lm-eval acc and target perplexity, and quanto's last-token accuracy"
    model_kind = "causal-lm"
    Config = LambadaConfig
    quality_metric = "acc"
    higher_is_better = True
    latency_metric = "ms_per_example"

    def load(self) -> list[Passage]:
        cfg = self.config
        records = read_records(cfg.dataset, self.data_dir, cfg.split)
        require_columns(records, [cfg.text_column], cfg.dataset)
        texts = cfg.select([str(r[cfg.text_column]) for r in records])
        short = next((t for t in texts if " " not in t.strip()), None)
        if short is not None:
            raise DataError(f"dataset {cfg.dataset}: passage {short[:40]!r} has no last word to predict")
        return [split_last_word(t) for t in texts]

    def evaluate(self, ctx: EvalContext, data: list[Passage]) -> TaskOutput:
        requests = scoring.encode(ctx, [(p.context, p.target) for p in data])
        # The quanto prediction is free where the target's tokens end the passage's own tokenization.
        whole = [tuple(ctx.tokenizer(p.text).input_ids) for p in data]
        extra = {
            i: len(requests) + n
            for n, i in enumerate(i for i, r in enumerate(requests) if r.context + r.continuation != whole[i])
        }
        requests += [loglik.Request(whole[i][:-1], whole[i][-1:]) for i in extra]
        run = scoring.score(ctx, requests, self.config)
        scores = run.scored.scores
        correct = [s.greedy for s in scores[: len(data)]]
        last_token = [scores[extra.get(i, i)].last_greedy for i in range(len(data))]
        logprobs = [s.logprob for s in scores[: len(data)]]
        n = len(data)
        acc, last_acc = sum(correct) / n, sum(last_token) / n
        mean_ll = sum(logprobs) / n
        sd_ll = math.sqrt(sum((x - mean_ll) ** 2 for x in logprobs) / (n - 1)) if n > 1 else math.nan
        perplexity = math.exp(-mean_ll)
        metrics = {
            "acc": acc,
            "acc_stderr": accuracy_stderr(acc, n),
            "perplexity": perplexity,
            "perplexity_stderr": perplexity * sd_ll / math.sqrt(n),
            "last_token_acc": last_acc,
            "last_token_acc_stderr": accuracy_stderr(last_acc, n),
            "n_separately_tokenized": len(extra),
        } | run.metrics(n)
        per_example = {"correct": correct, "last_token_correct": last_token, "target_logprob": logprobs}
        return TaskOutput(metrics, per_example)
