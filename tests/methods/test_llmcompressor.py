"""llmcompressor's GPTQ / AWQ / SmoothQuant methods: what each config asks llmcompressor for, the skip without its
environment; slow (needs ``scripts/setup_llmcompressor.sh``): on SmolLM2 GPTQ end to end (the packed bytes by hand,
perplexity against round-to-nearest, save -> reload) and llmcompressor's own refusal as one line; on a tiny Llama
asymmetric checkpoints' zero points, and AWQ's and SmoothQuant's stored bytes and save -> reload."""

from __future__ import annotations

import copy

import pytest
import torch

from quantarena import llmc
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS, quantize_with_calibration
from quantarena.methods.llmcompressor import AwqConfig, GptqConfig, SmoothQuantConfig, _ignored

needs_llmcompressor = pytest.mark.skipif(llmc.unmet() is not None, reason=str(llmc.unmet()))


def test_each_config_asks_llmcompressor_for_its_scheme():
    gptq = GptqConfig(group_size=64).job()
    assert gptq["recipe"] == "gptq" and gptq["activations"] is None
    assert gptq["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                               "group_size": 64, "actorder": "static"}  # fmt: skip
    assert GptqConfig(act_order="none").job()["weights"]["actorder"] is None
    awq = AwqConfig().job()
    assert awq["recipe"] == "awq" and awq["weights"]["symmetric"] is False and awq["weights"]["group_size"] == 128
    sq = SmoothQuantConfig(smoothing_strength=0.5).job()
    assert sq["recipe"] == "smoothquant-gptq" and sq["smoothing_strength"] == 0.5
    assert sq["weights"]["strategy"] == "channel" and sq["activations"]["dynamic"] is True
    with pytest.raises(ValueError):
        SmoothQuantConfig(smoothing_strength=1.5)
    with pytest.raises(ValueError, match="evaluation split"):
        GptqConfig(calibration_dataset="wikitext2")
    assert GptqConfig(calibration_dataset="sst2-train").calibrates_on() == "sst2-train"


def test_skipped_modules_become_llmcompressors_ignore_list(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert _ignored(model, ("lm_head",)) == ["lm_head"]
    assert _ignored(model, ("lm_head", "down_proj")) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                                         "lm_head"]  # fmt: skip


def test_without_its_environment_the_methods_skip_with_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv(llmc.ENV, str(tmp_path / "nowhere"))
    for name in ("llmc-gptq-w4a16", "llmc-awq-w4a16", "llmc-smoothquant-w8a8"):
        reason = METHODS.get(name).requires.unmet("cpu")
        assert llmc.SETUP in reason and llmc.ENV in reason
    with pytest.raises(llmc.LlmCompressorError, match="not installed"):
        llmc.oneshot({}, tmp_path / "job.json")


@pytest.mark.slow
@needs_llmcompressor
def test_group_128_on_576_wide_rows_is_llmcompressors_one_line_refusal(smollm2_wikitext, data_dir):
    model, tokenizer, _ = smollm2_wikitext
    method = METHODS.get("llmc-gptq-w4a16")
    config = method.config_cls(calibration_samples=2, calibration_seq_len=64)
    with pytest.raises(llmc.LlmCompressorError, match="not divisible by group_size") as error:
        quantize_with_calibration(method, config, copy.deepcopy(model), tokenizer, data_dir, torch.device("cpu"))
    assert "\n" not in str(error.value)


@pytest.mark.slow
@needs_llmcompressor
def test_gptq_on_smollm2_packs_as_computed_beats_rtn_and_reloads(smollm2_wikitext, data_dir, tmp_path, perplexity):
    model, tokenizer, ids = smollm2_wikitext
    method = METHODS.get("llmc-gptq-w4a16")
    config = method.config_cls(group_size=64, calibration_samples=32, calibration_seq_len=256)
    quantized = quantize_with_calibration(
        method, config, copy.deepcopy(model), tokenizer, data_dir, torch.device("cpu")
    )

    # One 576 x 576 layer: int4 codes, eight to an int32 (576 x 72), an fp32 scale per 64 weights (576 x 9), and
    # compressed-tensors' int64 shape pair; static act-order keeps groups contiguous, so no g_idx is stored.
    layer = quantized.model.layers[0].self_attn.q_proj
    stored = {n: t.nbytes for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    assert stored == {"weight_packed": 576 * 576 // 2, "weight_scale": 576 * 9 * 4, "weight_shape": 16}

    # Saved before any forward (compressed-tensors decompresses at the first one), as a sweep caches it.
    method.save(quantized, tmp_path / "q")
    reloaded = method.reloader(tmp_path / "q", "cpu")
    assert weight_bytes(reloaded) == weight_bytes(quantized)

    own = METHODS.get("own-int4")
    rtn = own.apply(copy.deepcopy(model), own.config_cls(group_size=128))
    fp32, gptq, own_int4 = perplexity(model, ids), perplexity(quantized, ids), perplexity(rtn, ids)
    assert fp32 < gptq < own_int4
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids[:, :64]).logits, quantized(input_ids=ids[:, :64]).logits)


@pytest.mark.slow
@needs_llmcompressor
def test_asymmetric_checkpoints_load_their_packed_zero_points_and_reload(tiny_llama_dir, data_dir, tmp_path):
    """compressed-tensors writes an asymmetric layer's zero points packed eight to an int32 along the rows, and
    its own meta layout expects them unpacked (llm-compressor issue 1618): loaded here, every weight is
    (q - zero point) * scale of the checkpoint's own tensors, unpacked by compressed-tensors' helpers."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    method = METHODS.get("llmc-gptq-w4a16")
    config = method.config_cls(group_size=32, symmetric=False, calibration_samples=4, calibration_seq_len=32)
    quantized = quantize_with_calibration(method, config, model, tokenizer, data_dir, torch.device("cpu"))
    method.save(quantized, tmp_path / "q")
    reloaded = method.reloader(tmp_path / "q", "cpu")
    assert weight_bytes(reloaded) == weight_bytes(quantized)

    layer = quantized.model.layers[0].mlp.down_proj  # 64 x 160: five groups a row
    packed = {n: t.clone() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    assert packed["weight_zero_point"].shape == (64 // 8, 5) and packed["weight_zero_point"].dtype == torch.int32
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits)  # decompresses
    q = unpack_from_int32(packed["weight_packed"], 4, torch.Size([64, 160])).float()
    zero_point = unpack_from_int32(packed["weight_zero_point"], 4, torch.Size([64, 5]), packed_dim=0).float()
    assert zero_point.unique().numel() > 1  # asymmetric: the zero points differ
    by_hand = (q - zero_point.repeat_interleave(32, dim=1)) * packed["weight_scale"].repeat_interleave(32, dim=1)
    assert torch.allclose(layer.weight.float(), by_hand, rtol=0, atol=1e-6)


@pytest.mark.slow
@needs_llmcompressor
@pytest.mark.parametrize(
    "name, options, stored",
    [
        # AWQ (asymmetric int4, groups of 32) on a 64 x 160 layer: codes eight to an int32, an fp32 scale a group,
        # zero points packed eight to an int32 along the rows, the int64 shape pair.
        ("llmc-awq-w4a16", {"group_size": 32},
         {"weight_packed": 64 * 160 // 2, "weight_scale": 64 * 5 * 4, "weight_zero_point": 8 * 5 * 4,
          "weight_shape": 16}),
        # SmoothQuant + GPTQ W8A8: int8 codes and an fp32 scale per row; activations are quantized per token at run
        # time, so nothing is stored for them.
        ("llmc-smoothquant-w8a8", {}, {"weight": 64 * 160, "weight_scale": 64 * 4}),
    ],
)  # fmt: skip
def test_awq_and_smoothquant_store_their_formats_and_reload(tiny_llama_dir, data_dir, tmp_path, name, options, stored):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    method = METHODS.get(name)
    config = method.config_cls(**options, calibration_samples=4, calibration_seq_len=32)
    quantized = quantize_with_calibration(method, config, model, tokenizer, data_dir, torch.device("cpu"))
    layer = quantized.model.layers[0].mlp.down_proj
    assert {n: t.nbytes for n, t in [*layer.named_parameters(), *layer.named_buffers()]} == stored
    method.save(quantized, tmp_path / "q")
    reloaded = method.reloader(tmp_path / "q", "cpu")
    assert weight_bytes(reloaded) == weight_bytes(quantized)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.inference_mode():
        logits = quantized(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
