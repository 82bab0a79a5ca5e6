"""The CPU backend's one-call attention and block against the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agent.decoder.generate import decode_one, prefill
from agent.decoder.kernels import get_backend
from agent.decoder.kernels.cpu import CpuBackend
from agent.decoder.model import apply_rope
from tests.decoder_fixtures import fp32_engine


@pytest.fixture(scope="module")
def kernel(settings):
    backend = get_backend("cpu", settings.cache_dir)
    assert isinstance(backend, CpuBackend)
    if not backend.native:
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    return backend.token_attention_kernel()


def reference(qkv, k, v, layer, slots, positions, cos, sin, n_head, n_kv):
    """RoPE, cache write and softmax attention with PyTorch ops, row by row."""
    d = k.shape[-1]
    x = qkv.view(len(slots), n_head + 2 * n_kv, d)
    qk = apply_rope(x[:, :n_head + n_kv], cos[positions][:, None], sin[positions][:, None])
    out = []
    for row, (slot, p) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        k[layer, slot, :, p] = qk[row, n_head:]
        v[layer, slot, :, p] = x[row, n_head + n_kv:]
        keys = k[layer, slot, :, :p + 1].repeat_interleave(n_head // n_kv, 0)
        values = v[layer, slot, :, :p + 1].repeat_interleave(n_head // n_kv, 0)
        y = F.scaled_dot_product_attention(qk[row, :n_head, None], keys, values)
        out.append(y.reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize(("n_head", "n_kv", "d"), [(9, 3, 64), (14, 2, 64), (4, 4, 40),
                                                  (2, 1, 36)])
def test_matches_the_pytorch_ops_on_random_caches(kernel, n_head, n_kv, d):
    torch.manual_seed(n_head)
    layers, n_slots, length = 3, 6, 700
    k, v = torch.randn(layers, n_slots, n_kv, length, d), torch.randn(layers, n_slots, n_kv,
                                                                       length, d)
    k_ref, v_ref = k.clone(), v.clone()
    angles = torch.rand(length, d // 2) * 20
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([4, 0, 2])  # any slots, in any order
    positions = torch.tensor([0, 37, 650])  # a first token, a short and a long history
    qkv = torch.randn(3, (n_head + 2 * n_kv) * d)
    got = kernel(qkv, k, v, 1, slots, positions, cos, sin, n_head, n_kv)
    want = reference(qkv, k_ref, v_ref, 1, slots, positions, cos, sin, n_head, n_kv)
    assert got.shape == (3, n_head * d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-6, atol=1e-6)  # the new keys, rotated
    assert torch.equal(v, v_ref)  # the new values, as they came


@pytest.mark.parametrize(("n_head", "n_kv"), [(9, 3), (14, 2)])
def test_query_heads_sharing_a_kv_head_go_together_over_long_histories(kernel, n_head, n_kv):
    """Eight streams past 512 positions: each KV head's query heads take its keys in runs
    of 64 together (attention.h); the result is still the PyTorch ops' on any history
    length, whole runs or not."""
    torch.manual_seed(n_head + 1)
    layers, n_slots, length, d = 2, 8, 800, 64
    k = torch.randn(layers, n_slots, n_kv, length, d).half()
    v = torch.randn(layers, n_slots, n_kv, length, d).half()
    k_ref, v_ref = k.float(), v.float()
    angles = torch.rand(length, d // 2) * 20
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    positions = torch.tensor([511, 512, 575, 576, 600, 640, 700, 799])
    qkv = torch.randn(8, (n_head + 2 * n_kv) * d)
    got = kernel(qkv, k, v, 0, slots, positions, cos, sin, n_head, n_kv)
    want = reference(qkv, k_ref, v_ref, 0, slots, positions, cos, sin, n_head, n_kv)
    # Looser than above: the kernel reads each new key and value back from float16.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_a_float16_cache_is_read_and_written_like_a_float32_one(kernel):
    """The kernel backends keep keys and values in float16: attention over a float16 cache
    equals attention over the float32 values it holds, and new keys and values are written
    into it as float16. (The new tokens' keys and values are chosen exact in float16, at
    positions whose rotation is the identity, so both caches receive the same values.)"""
    torch.manual_seed(3)
    n_head, n_kv, d, length = 9, 3, 64, 300
    k = torch.randn(2, 4, n_kv, length, d).half()
    v = torch.randn(2, 4, n_kv, length, d).half()
    k32, v32 = k.float(), v.float()
    angles = torch.rand(length, d // 2) * 20
    slots, positions = torch.tensor([3, 1]), torch.tensor([5, 290])
    angles[positions] = 0.0
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(2, (n_head + 2 * n_kv) * d).half().float()
    got = kernel(qkv, k, v, 1, slots, positions, cos, sin, n_head, n_kv)
    want = kernel(qkv, k32, v32, 1, slots, positions, cos, sin, n_head, n_kv)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert k.dtype == torch.float16 and torch.equal(k.float(), k32)
    assert torch.equal(v.float(), v32)
    new_key = qkv.view(2, -1, d)[1, n_head]  # row 1's first key head, slot 1, position 290
    assert torch.equal(k[1, 1, 0, 290].float(), new_key)


def test_a_float16_cache_keeps_the_models_answers(kernel, settings):
    """The kernel backends' models keep keys and values in float16 (half the memory per
    stream). With fp32 linears, so the cache is the only difference, two streams' greedy
    replies equal those of a float32 cache and their logits stay within 0.05 (of ~25).
    (The NF4 engine is not the yardstick here: its int8 activations turn any perturbation,
    even 1e-4 of the embeddings, into logit changes of ~1.7.)"""
    from agent.decoder.engine import load_engine

    quantised = load_engine("smollm2", settings=settings, backend="cpu", progress=False)
    if quantised.model.token_attention is not None:
        assert quantised.model.cache_dtype == torch.float16
        assert quantised.kv_bytes_per_token == quantised.model.new_cache(1, 8).bytes_per_token
    engine = fp32_engine("smollm2")
    model = engine.model
    model.token_attention = kernel
    prompts = [engine.encode_prompt(q) for q in
               ("What is the capital of France?", "Name three colours.")]
    replies, logits = {}, {}
    with torch.inference_mode():
        for dtype in (torch.float16, torch.float32):
            model.cache_dtype = dtype
            cache = model.new_cache(2, 256)
            first = torch.stack([prefill(model, cache, s, p) for s, p in enumerate(prompts)])
            tokens, positions = first.argmax(-1).tolist(), [len(p) for p in prompts]
            replies[dtype], logits[dtype] = [tokens], [first]
            for _ in range(24):
                step = decode_one(model, cache, tokens, [0, 1], positions)
                tokens, positions = step.argmax(-1).tolist(), [p + 1 for p in positions]
                replies[dtype].append(tokens)
                logits[dtype].append(step)
    model.cache_dtype, model.token_attention = torch.float32, None
    assert replies[torch.float16] == replies[torch.float32]
    for half, full in zip(logits[torch.float16], logits[torch.float32], strict=True):
        torch.testing.assert_close(half, full, rtol=0, atol=0.05)


def test_out_of_range_slots_and_positions_are_refused(kernel):
    k = v = torch.zeros(1, 2, 1, 8, 8)
    tables = torch.ones(8, 4), torch.zeros(8, 4)
    qkv = torch.zeros(1, 24)
    with pytest.raises(RuntimeError, match="slot"):
        kernel(qkv, k, v, 0, torch.tensor([2]), torch.tensor([0]), *tables, 1, 1)
    with pytest.raises(RuntimeError, match="position"):
        kernel(qkv, k, v, 0, torch.tensor([0]), torch.tensor([8]), *tables, 1, 1)


def test_the_model_decodes_the_same_with_the_kernel(kernel):
    """fp32 linears, so attention is the only difference: three streams in scattered
    slots at different positions give the same tokens and logits either way (the
    prompts' prefill runs through the kernel too)."""
    engine = fp32_engine("smollm2")
    model = engine.model
    prompts = [engine.encode_prompt(q) for q in
               ("What is the capital of France?", "Name a colour.", "Count to three: one,")]
    slots = [5, 1, 3]
    runs = {}
    with torch.inference_mode():
        for label, fused in (("torch", None), ("kernel", kernel)):
            model.token_attention = fused
            cache = model.new_cache(6, 256)
            tokens = [int(prefill(model, cache, s, p).argmax())
                      for s, p in zip(slots, prompts, strict=True)]
            positions = [len(p) for p in prompts]
            steps = []
            for _ in range(12):
                logits = decode_one(model, cache, tokens, slots, positions)
                steps.append(logits)
                tokens = logits.argmax(dim=-1).tolist()
                positions = [p + 1 for p in positions]
            runs[label] = steps
    model.token_attention = None
    for ours, theirs in zip(runs["kernel"], runs["torch"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_a_prompt_in_chunks_attends_causally(kernel):
    """A prompt prefilled in 24-token chunks through the kernel (each chunk's rows share a
    slot, so attention is causal by position) gives the logits of the PyTorch path."""
    engine = fp32_engine("smollm2")
    model = engine.model
    ids = engine.tokenizer.encode("The history of the bicycle begins in Europe, when "
                                  "inventors built machines pushed along by the feet. " * 3)
    assert len(ids) > 48  # three chunks
    logits = {}
    with torch.inference_mode():
        for label, fused in (("torch", None), ("kernel", kernel)):
            model.token_attention = fused
            cache = model.new_cache(2, 256)
            logits[label] = prefill(model, cache, 1, ids, chunk=24)
    model.token_attention = None
    torch.testing.assert_close(logits["kernel"], logits["torch"], rtol=1e-4, atol=2e-4)


def test_the_one_call_block_equals_the_modules_to_the_bit(settings):
    """NF4 model: prefill and decode steps through each block's one C++ call give exactly
    the logits of the modules calling the same kernels one by one."""
    from agent.decoder.engine import load_engine

    engine = load_engine("smollm2", settings=settings, backend="cpu", progress=False)
    model = engine.model
    if model.layers[0].kernel_forward is None:
        pytest.skip("no C++ compiler: the CPU backend runs its PyTorch fallback")
    steps = [layer.kernel_forward for layer in model.layers]
    prompts = [engine.encode_prompt(q) for q in ("What is the capital of France?", "Hi!")]
    slots = [2, 0]
    runs = {}
    with torch.inference_mode():
        for label, fused in (("modules", [None] * len(steps)), ("block", steps)):
            for layer, step in zip(model.layers, fused, strict=True):
                layer.kernel_forward = step
            cache = model.new_cache(3, 128)
            first = [prefill(model, cache, s, p, chunk=8) for s, p in zip(slots, prompts,
                                                                          strict=True)]
            tokens = [int(f.argmax()) for f in first]
            positions = [len(p) for p in prompts]
            logits = [torch.stack(first)]
            for _ in range(6):
                logits.append(decode_one(model, cache, tokens, slots, positions))
                tokens = logits[-1].argmax(dim=-1).tolist()
                positions = [p + 1 for p in positions]
            runs[label] = torch.stack(logits)
    assert torch.equal(runs["block"], runs["modules"])
