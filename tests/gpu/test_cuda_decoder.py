"""What only a CUDA device can show: the decode step captured in CUDA graphs replays what
the same step computes eagerly, and the whole decoder on the GPU agrees with the CPU
reference. Skipped without CUDA (CI has none; `deploy/gpu-check.sh` runs this module on
a GPU machine, with the Triton kernel tests, before `parley bench gpu`)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the decoder's GPU path is tested in Triton's interpreter "
                "(tests/integration/test_triton_decoder.py) and here only on a GPU",
                allow_module_level=True)
pytest.importorskip("triton")

from agent.bench import gpu
from agent.decoder.cuda_graphs import DecodeRunner
from agent.decoder.sampling import Sampler, SamplingParams


def test_the_whole_decoder_on_cuda_agrees_with_the_cpu_reference() -> None:
    for result in gpu.check_tiny("cuda"):
        assert result["tokens_equal"], result
        assert result["max_rel_err"] < 1e-3, result


def test_graph_replay_equals_the_eager_step_for_every_bucket() -> None:
    """Batches of 1, 3 (padded to 4) and 5 (padded to 8), replayed from graphs captured
    once, give the logits of the same static step run eagerly, and the cache the same
    keys."""
    tri, _ = gpu.tiny_pair("nf4", "cuda")
    prompts = [list(range(5 + s, 25 + 3 * s)) for s in range(5)]
    results = []
    for graphs in (True, False):
        cache = tri.new_cache(6, 128)
        decode = DecodeRunner(tri, cache, graphs=graphs, static=True)
        out = []
        with torch.inference_mode():
            for s, p in enumerate(prompts):
                tri(torch.tensor([p]), cache, [s], [0])
            for batch in (1, 3, 5, 3):
                slots = list(range(batch))
                pos = [cache.lengths[s] for s in slots]
                out.append(decode([7] * batch, slots, pos).float().cpu())
        results.append((out, cache.k.float().cpu()))
    for got, want in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], equal_nan=True)


def test_sampling_and_the_mask_stay_on_the_device() -> None:
    logits = torch.randn(300, device="cuda")
    allowed = torch.zeros(300, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    params = SamplingParams(temperature=1.0, seed=5, mask_fn=lambda _: allowed)
    first = [Sampler(params)(logits, []) for _ in range(3)]
    assert len(set(first)) == 1 and first[0] in (3, 7, 11)
