"""Checkpoint folders a user may point llm_model at: what is read, and what is refused
with a message that says why (tiny synthetic folders; the real ones are in
tests/integration/test_hf_checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from agent.decoder.engine import resolve_model_path
from agent.decoder.hf_loader import gguf_name, load_hf_tensors, read_hf_header
from agent.decoder.tokenizer import CONTROL, NORMAL, UNUSED
from agent.errors import ConfigError

CONFIG = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "vocab_size": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True}


def tiny_folder(tmp_path: Path, config: dict | None = None, dtype=torch.bfloat16,
                extra: dict[str, torch.Tensor] | None = None) -> Path:
    cfg = {**CONFIG, **(config or {})}
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
             "mlp.down_proj.weight": (d, f)}
    seeded = torch.Generator().manual_seed(0)  # the same bytes, so the same NF4 cache key
    tensors = {f"model.layers.0.{k}": torch.randn(s, generator=seeded).to(dtype)
               for k, s in layer.items()}
    tensors["model.embed_tokens.weight"] = torch.randn(cfg["vocab_size"], d,
                                                       generator=seeded).to(dtype)
    tensors["model.norm.weight"] = torch.ones(d).to(dtype)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    tensors.update(extra or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|end|>"])  # id 3; 4-7 are the embedding's padding rows
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|end|>"}, "chat_template": "{{ messages[0].content }}"}))
    return tmp_path


def test_a_folder_reads_as_gguf_names_and_float32(tmp_path):
    header = read_hf_header(tiny_folder(tmp_path))
    assert header.args.n_kv_head == 1 and header.args.tied_embeddings
    assert set(header.tensor_types.values()) == {"BF16"}
    assert "blk.0.attn_q.weight" in header.tensor_types
    tensors = load_hf_tensors(header, skip=lambda n: n.startswith("blk."))
    assert set(tensors) == {"token_embd.weight", "output_norm.weight"}
    assert tensors["token_embd.weight"].dtype == torch.float32
    vocab = header.vocabulary
    assert vocab.tokens[:5] == ["a", "b", "ab", "<|end|>", "[PAD4]"]
    assert vocab.types[:5] == [NORMAL, NORMAL, NORMAL, CONTROL, UNUSED]
    assert len(vocab.tokens) == 8 and vocab.eos_id == 3 and vocab.chat_template


def test_a_folder_is_a_model_path(tmp_path, settings):
    folder = tiny_folder(tmp_path / "my-model")
    assert resolve_model_path(str(folder), settings) == ("my-model", folder)
    with pytest.raises(ConfigError, match="checkpoint folder"):
        resolve_model_path(str(tmp_path / "nothing-here"), settings)


@pytest.mark.parametrize(("change", "message"), [
    ({"config": {"model_type": "mistral"}}, "unsupported model_type 'mistral'"),
    ({"config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "RoPE scaling 'yarn'"),
    ({"config": {"hidden_act": "gelu"}}, "activation 'gelu'"),
    ({"config": {"tie_word_embeddings": False}}, "no lm_head"),
    ({"extra": {"model.layers.0.mlp.experts.0.weight": torch.ones(2)}}, "unexpected tensor"),
    ({"extra": {"model.layers.0.scale": torch.ones(2, dtype=torch.int8)}}, "unexpected tensor"),
    ({"dtype": torch.int8}, "16 or 32-bit floats"),
])
def test_what_the_decoder_cannot_run_is_refused_by_name(tmp_path, change, message):
    folder = tiny_folder(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        read_hf_header(folder)


def test_missing_files_are_named(tmp_path):
    folder = tiny_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        read_hf_header(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match=r"no \.safetensors"):
        read_hf_header(folder)


def test_hf_names_map_to_gguf_names():
    assert gguf_name("model.layers.11.self_attn.k_proj.bias") == "blk.11.attn_k.bias"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_bf16_folder_loads_in_nf4_and_its_cache_says_how(tmp_path, settings, double_quant):
    from dataclasses import replace

    from agent.decoder.engine import load_engine
    from agent.decoder.generate import generate
    from agent.decoder.quantize import nf4_cache_path
    from agent.decoder.sampling import SamplingParams

    folder = tiny_folder(tmp_path / "tiny-hf", {"hidden_size": 64, "intermediate_size": 128,
                                                "vocab_size": 16})
    # The shared cache folder: a fresh one would compile the CPU kernels again (~40 s).
    local = replace(settings, llm_nf4_double_quant=double_quant)
    engine = load_engine(folder, settings=local, progress=False)
    assert engine.weights == "nf4+q8"
    cached = nf4_cache_path(settings.cache_dir, folder, double_quant=double_quant)
    assert cached.is_file() and cached.name.startswith("tiny-hf-")
    assert ("-dq" in cached.name) == double_quant
    prompt = engine.tokenizer.encode("ab")
    deltas = list(generate(engine.model, engine.tokenizer, prompt,
                           SamplingParams(max_tokens=4)))
    assert sum(len(d.token_ids) for d in deltas) >= 1
    again = load_engine(folder, settings=local, progress=False)  # from the cache
    assert again.weights == "nf4+q8"
