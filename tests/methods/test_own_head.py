"""own-int8 / own-int4 with head=int8: the output head as own int8, a tied input embedding reading its codes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from quantarena.errors import ConfigError, ModelError
from quantarena.measure import weight_bytes
from quantarena.methods import METHODS
from quantarena.ownquant import Int8WeightLinear, TiedEmbedding, kernel_summary
from quantarena.ownquant.cpu import avx2_kernels_unavailable
from quantarena.ownquant.formats import dequantize_int8_per_channel

OWN_INT8_KERNEL = "int8pack_mm" if avx2_kernels_unavailable() else "int8_avx2"  # what own-int8 runs here


def quantized(folder, method_name: str, **options):
    method = METHODS.get(method_name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return method.apply(model, method.config_cls(**options))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("folder_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_the_tied_head_and_embedding_share_one_int8_copy(request, folder_fixture):
    folder = request.getfixturevalue(folder_fixture)
    float_head = quantized(folder, "own-int4")
    int8_head = quantized(folder, "own-int4", head="int8")
    head, embedding = int8_head.get_output_embeddings(), int8_head.get_input_embeddings()
    assert isinstance(head, Int8WeightLinear) and isinstance(embedding, TiedEmbedding)
    vocab, hidden = head.out_features, head.in_features
    # The fp32 matrix (held once, tied) becomes int8 codes and fp32 row scales, held once too.
    saved = vocab * hidden * 4 - (vocab * hidden + vocab * 4)
    assert weight_bytes(float_head) - weight_bytes(int8_head) == saved

    ids = torch.randint(0, vocab, (2, 9))
    with torch.inference_mode():
        assert torch.equal(embedding(ids), dequantize_int8_per_channel(head.qweight, head.scales)[ids])
        assert rel_err(int8_head(input_ids=ids).logits, float_head(input_ids=ids).logits) < 3e-2


def test_saved_once_and_reloaded_tied(tiny_llama_dir, tmp_path):
    method = METHODS.get("own-int8")
    model = quantized(tiny_llama_dir, "own-int8", head="int8")
    method.save(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert "lm_head.qweight" in tensors and not any(k.startswith("model.embed_tokens") for k in tensors)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False

    reloaded = method.reloader(tmp_path / "q", "cpu")
    assert isinstance(reloaded.get_input_embeddings(), TiedEmbedding)
    assert reloaded.get_input_embeddings()._head[0] is reloaded.get_output_embeddings()
    assert kernel_summary(reloaded) == kernel_summary(model) == {OWN_INT8_KERNEL: 15}
    assert weight_bytes(reloaded) == weight_bytes(model)
    ids = torch.randint(0, 30522, (2, 9))
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_model_without_an_output_head_is_refused(tiny_bert_dir):
    method = METHODS.get("own-int8")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    with pytest.raises(ConfigError, match="output head"):
        method.apply(model, method.config_cls(head="int8"))


@pytest.mark.parametrize("head", ["model.layers", "nowhere", ["lm_head"], None])
def test_a_map_tying_an_embedding_to_no_quantized_head_is_refused(tiny_llama_dir, tmp_path, head):
    method = METHODS.get("own-int8")
    method.save(quantized(tiny_llama_dir, "own-int8", head="int8"), tmp_path / "q")
    qmap_file = tmp_path / "q" / "quantarena_quant.json"
    qmap = json.loads(qmap_file.read_text())
    qmap["modules"]["model.embed_tokens"]["head"] = head
    qmap_file.write_text(json.dumps(qmap))
    with pytest.raises(ModelError, match="which is no quantized head"):
        method.reloader(tmp_path / "q", "cpu")
