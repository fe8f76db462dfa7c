"""Log-likelihood of continuations given contexts, as lm-evaluation-harness defines it, computed faster.

A request is a (context, continuation) pair of token ids; its score is the summed log-probability of the
continuation's tokens and whether each of them is the greedy (argmax) choice. The input the model sees is
lm-eval's: ``(context + continuation)[-(max_length + 1):][:-1]``.

What makes it fast: no context is computed twice, little is padding, and only scored positions get
logits. Requests sharing a context (the choices of a multiple-choice item) become one unit: the context
followed by each continuation minus its last token, every continuation attending to the context and
causally to itself (a block mask; position ids restart after the context), so the context's last
position scores every continuation's first token. Units are sorted by length; a forward takes up to
``batch_size`` rows as wide as its longest unit (or up to twice that, where wider rows pad less), and shorter
units share a row, isolated by the same mask.

Contexts that begin with the same prefix (the description and examples of few-shot prompts) compute it
once: sorted, neighbouring contexts that share at least ``SHARED_PREFIX`` tokens form a run, cut at its
weakest links wherever the parts' longer prefixes save more (``_split``); each group's common prefix (kept
shorter than its every context) is run alone once for its keys and values, and the
group's units, stripped of it, are packed as above with that cache expanded to every row, each real position
attending to the whole prefix and position ids continuing after it. Log-softmax is taken in float32 at least
(lm-eval takes it in the model's dtype, which for bf16 models differs). Models must accept a 4D attention
mask, position ids and a transformers ``Cache`` (transformers' do).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantarena.errors import DataError, ModelError
from quantarena.models import accepts_logits_to_keep

# Padded tokens per forward (a longer unit gets a forward of its own): bounds activations and logits.
ROW_TOKENS = 2048
# Contexts sharing a prefix this long compute it once (0-shot MMLU's one-line subject description, ~15 tokens,
# is worth sharing: 1.25x -> 1.4-1.5x lm-eval); shorter ones would cost a forward of their own for little.
SHARED_PREFIX = 8
# Row widths a forward tries, as multiples of its longest unit.
WIDENINGS = (1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # summed log-probability of the continuation
    greedy: bool  # every continuation token is the argmax (lm-eval's is_greedy)
    last_greedy: bool  # the continuation's last token is the argmax
    n_tokens: int


@dataclass
class Scored:
    scores: list[Score]
    n_forwards: int  # model calls: each reads every weight once
    n_tokens_forwarded: int  # input positions computed, padding included
    n_padding_tokens: int  # of those, padding
    n_scored_tokens: int  # positions whose logits were taken: one per continuation token


def _ids(tokenizer, text: str) -> list[int]:
    # The tokenizer's own default for special tokens, as lm-eval's HFLM (add_bos_token unset) does.
    return list(tokenizer(text).input_ids)


def encode_pair(tokenizer, context: str, continuation: str, prefix_token_id: int) -> Request:
    """lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the pair is
    tokenized whole and split after the context's own tokens; an empty context becomes the prefix token."""
    if not context:
        return Request((prefix_token_id,), tuple(_ids(tokenizer, continuation)))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _ids(tokenizer, context + continuation)
    context_ids = _ids(tokenizer, context)
    return Request(tuple(context_ids), tuple(whole[len(context_ids) :]))


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval conditions an empty context on: BOS, else EOS (else, for tokenizers with neither,
    the CLS token)."""
    for candidate in ("bos_token_id", "eos_token_id", "cls_token_id"):
        if getattr(tokenizer, candidate, None) is not None:
            return getattr(tokenizer, candidate)
    raise ModelError("the tokenizer has no BOS, EOS or CLS token to condition the first token of a text on")


def model_max_length(config, tokenizer, default: int = 2048) -> int:
    """lm-eval's ``resolve_max_length``: the text config's n_positions / max_position_embeddings / n_ctx,
    else the tokenizer's model_max_length when it is set, else ``default``."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None) is not None:
            return int(getattr(cfg, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < int(1e29) else default


def _fit(request: Request, max_length: int) -> Request:
    """lm-eval's left truncation: the model sees at most ``max_length`` positions."""
    if not request.continuation:
        raise DataError("a log-likelihood request has an empty continuation")
    if len(request.continuation) > max_length:
        raise DataError(f"a continuation of {len(request.continuation)} tokens exceeds max_length {max_length}")
    keep = max_length + 1 - len(request.continuation)
    return request if len(request.context) <= keep else Request(request.context[-keep:], request.continuation)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # Half-precision logits are widened: a bf16 log-softmax loses the small differences between choices.
    return F.log_softmax(logits.float() if logits.element_size() < 4 else logits, dim=-1)


@dataclass(frozen=True)
class _Unit:
    """A distinct context and the requests continuing it, laid out as context + every continuation but its
    last token (the last one is only ever a target)."""

    context: tuple[int, ...]
    requests: tuple[int, ...]
    length: int


def _units(requests: list[Request]) -> list[_Unit]:
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        by_context.setdefault(r.context, []).append(i)
    units = [
        _Unit(c, tuple(ids), len(c) + sum(len(requests[i].continuation) - 1 for i in ids))
        for c, ids in by_context.items()
    ]
    return sorted(units, key=lambda u: -u.length)


def _fill(rest: list[_Unit], width: int, batch_size: int) -> tuple[list[list[_Unit]], list[_Unit]]:
    """One forward's rows of ``width`` tokens, and the units left: each row opens with the longest unit left and
    its gap takes the longest that fit, until ``batch_size`` rows (or ROW_TOKENS padded tokens)."""
    left = list(rest)  # longest first
    negated = [-u.length for u in left]  # ascending, for bisect
    rows: list[list[_Unit]] = []
    while left and (not rows or (len(rows) < batch_size and (len(rows) + 1) * width <= ROW_TOKENS)):
        row = [left.pop(0)]
        negated.pop(0)
        gap = width - row[0].length
        while (i := bisect.bisect_left(negated, -gap)) < len(left):
            gap -= left[i].length
            row.append(left.pop(i))
            negated.pop(i)
        rows.append(row)
    return rows, left


def _packs(units: list[_Unit], batch_size: int) -> list[list[list[_Unit]]]:
    """Forwards of up to ``batch_size`` rows (and ROW_TOKENS padded tokens), filled as ``_fill`` does. A forward's
    rows are as wide as its longest unit or up to twice that, whichever wastes the least of the forward on
    padding: a wider row holds two shorter units where the narrowest would pad each (MMLU 0-shot: 25% of the
    positions were padding), and attention, the only cost that grows with width, is a small share at these
    widths (a 2048-token row's attention costs SmolLM2 a third of its matmuls)."""
    forwards, rest = [], units
    while rest:
        best = None
        for widening in WIDENINGS:
            rows, left = _fill(rest, int(rest[0].length * widening), batch_size)
            tokens = [sum(u.length for u in row) for row in rows]
            filled = sum(tokens) / (len(rows) * max(tokens))  # the forward is as wide as its fullest row
            if best is None or filled > best[0]:
                best = (filled, rows, left)
        forwards.append(best[1])
        rest = best[2]
    return forwards


@dataclass(frozen=True)
class _Prefix:
    """Keys and values, per layer, of tokens every row of a forward continues."""

    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class _Model:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.keeps_logits = accepts_logits_to_keep(model)
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.dtype = getattr(model, "dtype", torch.float32)
        self.n_forwards = self.n_tokens = self.n_padding = self.n_scored = 0

    def _forward(self, ids: torch.Tensor, keep: torch.Tensor, **inputs):
        """One model call: its logits (at positions ``keep`` only, where the model can), and its cache."""
        self.n_forwards += 1
        self.n_tokens += ids.numel()
        out = self.model(input_ids=ids, **inputs, **({"logits_to_keep": keep} if self.keeps_logits else {}))
        return out.logits, out.past_key_values

    def prefix(self, ids: tuple[int, ...]) -> _Prefix:
        from transformers import DynamicCache

        # A cache built without the model's config keeps every position of every layer. Only the keys and
        # values are wanted: one position's logits are the least the model computes.
        tokens, last = torch.tensor([ids], device=self.device), torch.tensor([len(ids) - 1], device=self.device)
        _, cache = self._forward(tokens, last, past_key_values=DynamicCache(), use_cache=True)
        return _Prefix(len(ids), [(k, v) for k, v, *_ in cache])

    def logits(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        keep: torch.Tensor,
        at: tuple[torch.Tensor, torch.Tensor],
        prefix: _Prefix | None = None,
    ):
        """Logits at the (row, position) pairs ``at``, all among positions ``keep``; ``allowed[r, q, k]``: may
        position q attend to k, where keys are ``prefix``'s positions (if any) followed by the row's own."""
        dtype = self.dtype if self.dtype.is_floating_point else torch.float32
        # Additive, so eager attention (which adds the mask) and SDPA both take it as is.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        # use_cache with a prefix: some models read past_key_values only then.
        inputs = {"position_ids": positions, "attention_mask": mask[:, None], "use_cache": prefix is not None}
        if prefix is not None:
            from transformers import DynamicCache

            # A fresh cache per forward: the forward appends its own keys to it (a copy; the prefix's stay
            # as they are for the next forward).
            cache = DynamicCache()
            for layer, (k, v) in enumerate(prefix.kv):
                cache.update(k.expand(len(ids), -1, -1, -1), v.expand(len(ids), -1, -1, -1), layer)
            inputs["past_key_values"] = cache
        return self._gathered(ids, keep, at, **inputs)

    def _gathered(self, ids: torch.Tensor, keep: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], **inputs):
        """Logits at the (row, position) pairs ``at`` only, as an (n, vocab) tensor.

        ``logits_to_keep`` keeps the same positions in every row, the union of what each row needs, which in
        packed rows is most of them; so the output head is handed only the hidden states of the pairs wanted
        (a pre-hook), the vocabulary-wide logits and log-softmax are computed for those alone, and what the
        model does after its head (a soft cap, a scale) still applies, being elementwise."""
        rows, positions = at
        # Where each pair is in what the head is handed: its index among ``keep``, or its position.
        columns = torch.searchsorted(keep, positions) if self.keeps_logits else positions
        gathered = []

        def gather(module, args):
            hidden = args[0]
            if gathered or hidden.dim() != 3 or hidden.shape[0] != len(ids):
                return None  # not the call on the last hidden states: leave it alone
            gathered.append(True)
            return (hidden[rows, columns][None], *args[1:])

        hook = self.head.register_forward_pre_hook(gather) if self.head is not None else None
        try:
            logits = self._forward(ids, keep, **inputs)[0]
        finally:
            if hook is not None:
                hook.remove()
        return logits[0] if gathered else logits[rows, columns]


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _shared(run: list[_Unit], links: list[int]) -> int:
    """Tokens a run of sorted units can share: the weakest link between neighbours, kept shorter than each
    context (a context's last position scores its continuations' first tokens, so it is computed with the
    unit)."""
    return min(*links, *(len(u.context) - 1 for u in run))


def _saved(groups: list[tuple[int, list[_Unit]]]) -> int:
    return sum((len(run) - 1) * n for n, run in groups if n >= SHARED_PREFIX)


def _split(run: list[_Unit], links: list[int], depth: int = 0) -> list[tuple[int, list[_Unit]]]:
    """(shared length, units) for a run of sorted units, ``links[i]`` the common prefix of units i and i+1.

    Sharing what the whole run shares, or cutting it at its weakest links into runs that share more (MMLU
    subjects all open with the same line, then each has its own few-shot examples): whichever computes
    fewer positions, decided recursively (to a bounded depth: contexts that extend one another in a long
    chain would otherwise recurse once per context)."""
    if len(run) < 2:
        return [(0, run)]
    whole = [(_shared(run, links), run)]
    weakest = min(links)
    cuts = [0, *(i + 1 for i, link in enumerate(links) if link == weakest), len(run)]
    if len(cuts) == 2 or depth == 64:
        return whole
    parts = [g for a, b in itertools.pairwise(cuts) for g in _split(run[a:b], links[a : b - 1], depth + 1)]
    return parts if _saved(parts) > _saved(whole) else whole


def _groups(units: list[_Unit]) -> list[tuple[tuple[int, ...], list[_Unit]]]:
    """(shared prefix, units stripped of it, longest first): one per group of units whose contexts begin with
    at least ``SHARED_PREFIX`` common tokens (sorted, such contexts are neighbours), then ``()`` and the units
    left whole."""
    ordered = sorted(units, key=lambda u: u.context)
    links = [_common(a.context, b.context) for a, b in itertools.pairwise(ordered)]
    groups, whole = [], []
    for n, run in _split(ordered, links) if ordered else []:
        if len(run) < 2 or n < SHARED_PREFIX:
            whole += run
            continue
        stripped = [_Unit(u.context[n:], u.requests, u.length - n) for u in run]
        groups.append((run[0].context[:n], sorted(stripped, key=lambda u: -u.length)))
    return [*groups, ((), sorted(whole, key=lambda u: -u.length))]


def score(
    model: torch.nn.Module,
    requests: Sequence[Request],
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Scored:
    """Score every request; results come back in request order."""
    fitted = [_fit(r, max_length) for r in requests]
    runner = _Model(model, device)
    scores: list[Score | None] = [None] * len(fitted)
    done = 0
    with torch.inference_mode():
        for shared, units in _groups(_units(fitted)):
            prefix = runner.prefix(shared) if shared else None
            for pack in _packs(units, batch_size):
                for i, s in _score_pack(runner, pack, fitted, prefix).items():
                    scores[i] = s
                done += sum(len(u.requests) for row in pack for u in row)
                if progress:
                    progress(done, len(fitted))
    return Scored(scores, runner.n_forwards, runner.n_tokens, runner.n_padding, runner.n_scored)  # type: ignore[arg-type]


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def _score_pack(
    runner: _Model, rows: list[list[_Unit]], requests: list[Request], prefix: _Prefix | None = None
) -> dict[int, Score]:
    """One forward. In a row, each unit's context attends causally to itself, each continuation to its
    context and causally to itself; nothing attends across units or continuations, or to padding. With a
    ``prefix`` (the part of every unit's context it holds), every real position also attends to all of it."""
    width = max(sum(u.length for u in row) for row in rows)
    offset = prefix.length if prefix else 0
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    # Padding attends to itself only: no row of the mask is empty (an all-masked softmax is NaN).
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)
    scored_at: dict[int, tuple[int, list[int]]] = {}  # request -> (row, positions predicting its tokens)
    used = []  # real (non-padding) positions per row
    for row, units in enumerate(rows):
        start = 0
        for unit in units:
            n = len(unit.context)
            ids[row, start : start + n] = torch.tensor(unit.context)
            positions[row, start : start + n] = torch.arange(n)
            allowed[row, start : start + n, start : start + n] = _causal(n)
            at = start + n
            for i in unit.requests:
                k = len(requests[i].continuation) - 1
                ids[row, at : at + k] = torch.tensor(requests[i].continuation[:-1], dtype=torch.long)
                positions[row, at : at + k] = n + torch.arange(k)
                allowed[row, at : at + k, start : start + n] = True
                allowed[row, at : at + k, at : at + k] = _causal(k)
                scored_at[i] = (row, [start + n - 1, *range(at, at + k)])
                at += k
            start = at
        used.append(start)
    if prefix is not None:
        real = torch.arange(width) < torch.tensor(used)[:, None]
        allowed = torch.cat([real[:, :, None].expand(-1, -1, offset), allowed], dim=-1)
    keep = torch.tensor(sorted({p for _, ps in scored_at.values() for p in ps}))
    dev = runner.device
    order = list(scored_at)
    row_of = torch.tensor([scored_at[i][0] for i in order for _ in scored_at[i][1]], device=dev)
    position = torch.tensor([p for i in order for p in scored_at[i][1]], device=dev)
    inputs = (ids.to(dev), (positions + offset).to(dev), allowed.to(dev), keep.to(dev), (row_of, position))
    scored = _log_softmax(runner.logits(*inputs, prefix))
    targets = torch.tensor([t for i in order for t in requests[i].continuation], device=dev)
    runner.n_padding += len(rows) * width - sum(used)
    runner.n_scored += len(targets)
    picked = scored[torch.arange(len(targets), device=dev), targets].tolist()
    hits = (scored.argmax(-1) == targets).tolist()
    out, at = {}, 0
    for i in order:
        m = len(requests[i].continuation)
        out[i] = Score(float(sum(picked[at : at + m])), all(hits[at : at + m]), hits[at + m - 1], m)
        at += m
    return out
