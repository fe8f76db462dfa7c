"""GGUF files made by llama.cpp: every GGML type's PyTorch dequantizer against the gguf package's, a file's tensors
mapped back into the model (rows the converter permuted included), and on SmolLM2 (slow, needs the llama.cpp
build) the k-quant methods end to end: bytes as the file's, perplexity bounds, save -> reload."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from transformers import AutoModelForCausalLM

from quantarena import llamacpp, models
from quantarena.errors import ModelError
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.methods.llamacpp import _row_order, load_gguf_weights
from quantarena.ownquant import QuantizedEmbedding, TiedEmbedding
from quantarena.ownquant.ggml import TYPES, GgufWeightLinear, dequantize_rows, quantize_blocks

needs_llama_cpp = pytest.mark.skipif(llamacpp.unmet() is not None, reason=str(llamacpp.unmet()))


@pytest.mark.parametrize("name", TYPES)
def test_every_type_dequantizes_as_the_gguf_package(name):
    ggml_type = TYPES[name]
    qtype = GGMLQuantizationType[name.upper()]
    assert GGML_QUANT_SIZES[qtype] == (ggml_type.block_size, ggml_type.type_size)
    # Any bytes are a valid block (NaN and inf scales included): both sides must read them identically.
    data = np.random.default_rng(0).integers(0, 256, (5, 3 * ggml_type.type_size), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32))
    ours = dequantize_rows(torch.from_numpy(data), ggml_type)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)
    rows = torch.tensor([[4, 0], [2, 2]])
    torch.testing.assert_close(
        GgufWeightLinear(torch.from_numpy(data), 3 * ggml_type.block_size, ggml_type, None).dequantize_rows(
            rows, torch.float32
        ),
        reference[rows],
        rtol=0,
        atol=0,
        equal_nan=True,
    )


def test_true_bytes_of_one_layer_by_hand():
    # SmolLM2's ffn_down in Q4_K: 576 rows of 1536 weights, 6 blocks of 256 per row, 144 bytes per block
    # (fp16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles): 4.5 bits per weight.
    layer = GgufWeightLinear(torch.zeros(576, 6 * 144, dtype=torch.uint8), 1536, TYPES["q4_k"], None)
    assert weight_bytes(layer) == 576 * 6 * (2 + 2 + 12 + 128) == 497_664
    assert TYPES["q4_k"].bits_per_weight == 4.5 and TYPES["q6_k"].bits_per_weight == 6.5625
    with pytest.raises(ValueError, match="not 1536 weights"):
        GgufWeightLinear(torch.zeros(576, 6 * 144, dtype=torch.uint8), 1536, TYPES["q6_k"], None)


def test_row_order_undoes_a_permutation_and_refuses_any_other_change():
    weight = torch.randn(6, 4)
    weight[5] = weight[1]  # identical rows each get their own place
    perm = torch.tensor([3, 1, 0, 5, 4, 2])
    order = _row_order(weight, weight[perm].numpy(), "blk.0.attn_q.weight")
    assert torch.equal(weight[order], weight[perm]) and sorted(order.tolist()) == list(range(6))
    changed = weight[perm].clone()
    changed[0, 0] += 1e-3
    with pytest.raises(ModelError, match="beyond reordering its rows"):
        _row_order(weight, changed.numpy(), "blk.0.attn_q.weight")


def _llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: q and k rows regrouped for GGML's rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, tensors: dict[str, np.ndarray], raw_dtype: GGMLQuantizationType | None):
    writer = GGUFWriter(path, "llama")
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [True, False])
def test_a_files_tensors_replace_the_layers_rows_permuted_back(tiny_llama_dir, tmp_path, tied):
    """A file as llama.cpp's converter lays it out (q and k rows permuted; a tied head as token_embd only), its
    tensors in Q8_0: the loaded model computes exactly what Q8_0 of the model's own rows computes, and saves and
    reloads as it is."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, tie_word_embeddings=tied).eval()
    config = model.config
    names = {"model.embed_tokens": "token_embd"} | ({} if tied else {"lm_head": "output"})
    for i in range(config.num_hidden_layers):
        for hf, gg in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")]:  # fmt: skip
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    converted = {}
    for hf, gg in names.items():
        w = model.get_submodule(hf).weight.detach()
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gg.split(".")[-1])
        converted[f"{gg}.weight"] = (_llama_permute(w, heads) if heads else w).numpy()
    _write_gguf(tmp_path / "f32.gguf", converted, None)
    q8 = {n: quantize_blocks(torch.from_numpy(w), TYPES["q8_0"]).numpy() for n, w in converted.items()}
    _write_gguf(tmp_path / "q8_0.gguf", q8, GGMLQuantizationType.Q8_0)

    expected = copy.deepcopy(model)
    for hf in names:
        if hf != "model.embed_tokens":
            expected.set_submodule(hf, GgufWeightLinear.from_linear(expected.get_submodule(hf), TYPES["q8_0"]))
    if tied:
        head = GgufWeightLinear.from_linear(expected.lm_head, TYPES["q8_0"])
        expected.lm_head, expected.model.embed_tokens = head, TiedEmbedding(head)
    else:
        table = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        table.weight = model.model.embed_tokens.weight
        expected.model.embed_tokens = QuantizedEmbedding(GgufWeightLinear.from_linear(table, TYPES["q8_0"]))

    loaded = load_gguf_weights(model, tmp_path / "q8_0.gguf", tmp_path / "f32.gguf")
    embedding = loaded.model.embed_tokens
    if tied:
        assert isinstance(embedding, TiedEmbedding) and embedding._head[0] is loaded.lm_head
    else:
        assert isinstance(embedding, QuantizedEmbedding) and embedding.rows is not loaded.lm_head
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(tmp_path / "q8_0.gguf").tensors)
    floats = [t for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if not n.endswith("qweight")]
    assert weight_bytes(loaded) == file_bytes + sum(t.nbytes for t in floats)  # + norms, rotary frequencies
    ids = torch.randint(0, config.vocab_size, (2, 7))
    method = METHODS.get("gguf-q4_k_m")
    method.save(loaded, tmp_path / "saved")
    reloaded = method.reloader(tmp_path / "saved", "cpu")
    assert weight_bytes(reloaded) == weight_bytes(loaded)
    with torch.inference_mode():
        logits = loaded(input_ids=ids).logits
        assert torch.equal(logits, expected(input_ids=ids).logits)
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_without_the_build_the_methods_skip_with_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "nowhere"))
    reason = METHODS.get("gguf-q4_k_m").requires.unmet("cpu")
    assert "llama-quantize" in reason and llamacpp.BUILD in reason and llamacpp.ENV in reason
    with pytest.raises(llamacpp.LlamaCppError, match=r"llama-quantize: needs llama\.cpp's"):
        llamacpp.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M")


@needs_llama_cpp
def test_a_failing_tool_is_one_line_with_its_last_words(tmp_path):
    (tmp_path / "in.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(llamacpp.LlamaCppError, match=r"llama-quantize failed \(exit \d+\): ") as error:
        llamacpp.quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M")
    assert "\n" not in str(error.value)


@pytest.mark.slow
@needs_llama_cpp
def test_q4_k_m_on_smollm2_holds_the_files_bytes_beats_rtn_and_reloads(
    smollm2_wikitext, data_dir, tmp_path, perplexity
):
    model, tokenizer, ids = smollm2_wikitext
    method = METHODS.get("gguf-q4_k_m")
    quantized = quantize_with_calibration(
        method, method.config_cls(), copy.deepcopy(model), tokenizer, data_dir, torch.device("cpu")
    )
    types = {m.ggml_type.name for m in quantized.modules() if isinstance(m, GgufWeightLinear)}
    # 576-wide rows fall back to 32-weight blocks (Q5_0, Q8_0); 1536-wide ffn_down keeps Q4_K/Q6_K.
    assert types == {"q4_k", "q6_k", "q5_0", "q8_0"}
    down = quantized.model.layers[0].mlp.down_proj
    assert down.ggml_type.name in ("q4_k", "q6_k") and down.qweight.shape == (576, 6 * down.ggml_type.type_size)

    own = METHODS.get("own-int4")
    rtn = own.apply(copy.deepcopy(model), own.config_cls(group_size=128))
    fp32, gguf, own_int4 = perplexity(model, ids), perplexity(quantized, ids), perplexity(rtn, ids)
    assert fp32 < gguf < own_int4

    method.save(quantized, tmp_path / "q")
    reloaded = method.reloader(tmp_path / "q", "cpu")
    assert weight_bytes(reloaded) == weight_bytes(quantized)
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids[:, :64]).logits, quantized(input_ids=ids[:, :64]).logits)


def test_bad_calibration_data_fails_before_any_conversion(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    from quantarena.errors import DataError

    monkeypatch.setattr(llamacpp, "convert", lambda *a: pytest.fail("converted before the data was read"))
    model, tokenizer = models.load(models.resolve(str(tiny_llama_dir)), "causal-lm", seed=0)
    method = METHODS.get("gguf-iq4_xs")
    config = method.config_cls(calibration_dataset=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"missing\.jsonl"):
        quantize_with_calibration(method, config, model, tokenizer, data_dir, torch.device("cpu"))


def _bench_records(prompt: int, new_tokens: int, depth: int) -> str:
    record = {"n_threads": 2, "build_commit": "x", "samples_ns": [2e6]}
    return json.dumps(
        [
            record | {"n_prompt": prompt, "n_gen": 0, "n_depth": 0},
            record | {"n_prompt": 0, "n_gen": new_tokens, "n_depth": depth},
        ]
    )


def test_llama_bench_retries_unrepacked_after_a_crash_and_says_so(monkeypatch):
    """llama.cpp's AMX kernels segfault on prompts on some Xeons (its issue 20824): the file is timed without
    weight repacking, and the row says so; an ordinary failure is still an error."""
    calls = []

    def crashing(what, args):
        calls.append([str(a) for a in args])
        if "--repack" not in calls[-1]:
            raise llamacpp.LlamaCppError("llama-bench failed (exit -11): no output", -11)
        return _bench_records(16, 4, 8)

    monkeypatch.setattr(llamacpp, "_run", crashing)
    timed = llamacpp.bench("m.gguf", [16], 4, 8)
    assert calls[-1][-2:] == ["--repack", "0"] and len(calls) == 2
    assert timed["repacked"].startswith("no: with repacking, llama-bench failed (exit -11)")
    assert timed["prefill_ms"] == {"16": 2.0} and timed["decode_ms_per_token"] == 0.5

    monkeypatch.setattr(llamacpp, "_run", lambda what, args: _bench_records(16, 4, 8))
    assert llamacpp.bench("m.gguf", [16], 4, 8)["repacked"] is True

    def failing(what, args):
        raise llamacpp.LlamaCppError("llama-bench failed (exit 1): no such file", 1)

    monkeypatch.setattr(llamacpp, "_run", failing)
    with pytest.raises(llamacpp.LlamaCppError, match="exit 1"):
        llamacpp.bench("m.gguf", [16], 4, 8)
