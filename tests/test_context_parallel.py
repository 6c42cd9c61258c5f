"""Context parallelism: two CPU processes over gloo split a video's tokens, and every attention method gives what one
process gives.

One spawn of two ranks runs every case (starting the processes costs more than the cases) and saves each rank's
outputs; the tests below read them.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

import attention
from attention.methods.block_sparse import method_density
from pipelines import TextToVideoPipeline
from pipelines.parallel import enable_context_parallel
from t2v.data import vocabulary
from t2v.models import TextEncoder, VideoDiT
from t2v.models.block_dit import block_model_from
from tiny_models import TINY_DIT, TINY_TEXT, randomised, tiny_models

RANKS = 2
GRID = (4, 4, 4)  # the tiny VideoDiT's tokens for these latents (patch (1, 2, 2)): 32 per rank
# Blocks of 8 tokens (2x2x2 tiles), so that the 64 tokens make 8 blocks a method can choose among; xattention and
# the oracle keep every block at their default thresholds here, so they get a sparsity.
CASES = {
    "dense": ("dense", {}),
    "vmoba": ("vmoba", {"block_size": 8}),
    "rectified": ("rectified", {"block_size": 8}),
    "xattention": ("xattention", {"block_size": 8, "sparsity": 0.5}),
    "oracle": ("oracle", {"block_size": 8, "sparsity": 0.5}),
    "flashblock": ("flashblock", {"chunk_method": "vmoba", "block_size": 8}),  # on a VideoDiT: its in-chunk method
    "vmoba-half-the-blocks": ("vmoba", {"block_size": 8, "sparsity": 0.5}),
    # Layer 0 goes to the model's own processor, so through diffusers' own Ulysses attention.
    "vmoba-first-layer-dense": ("vmoba", {"block_size": 8, "dense_layers": 0}),
}


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 4, 8, 8, generator=generator), torch.tensor([900.0, 300.0]),
            torch.randn(2, 5, 16, generator=generator))


def _run(model):
    with torch.no_grad():
        return model(*_inputs()).sample


def _tiny_dit():
    return tiny_models()["video-dit"]


def _ulysses_cases() -> dict:
    reference, split = _tiny_dit(), _tiny_dit()
    # Installed before enabling: diffusers' config must still reach the processors that serve fallback calls.
    attention.apply(split, "dense")
    enable_context_parallel(split)
    local_tokens = []
    split.blocks[0].attn1.register_forward_pre_hook(lambda module, args: local_tokens.append(args[0].shape[1]))
    results = {}
    for name, (method, options) in CASES.items():
        attention.apply(reference, method, **options)
        attention.apply(split, method, **options)
        results[name] = dict(split=_run(split), reference=_run(reference), split_density=method_density(split),
                             reference_density=method_density(reference))
    results["layout_grid"] = attention.adapter_state(split).layout.grid
    results["local_tokens"] = set(local_tokens)
    try:
        split.check_video_shape(3, 6, 6)
    except ValueError as error:
        results["uneven_error"] = str(error)
    return results


def _gradient_case() -> dict:
    """The blocks' weight gradients of a sparse method's output, summed over the ranks (each backpropagates through
    its share of the tokens; the exchange routes the rest)."""
    grads = {}
    for name in ("reference", "split"):
        model = _tiny_dit()
        if name == "split":
            enable_context_parallel(model)
        attention.apply(model, "vmoba", block_size=8, sparsity=0.5)
        model(*_inputs()).sample.square().mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.blocks.parameters()])
    dist.all_reduce(grads["split"])
    return grads


_FLASH_ON_CPU = None  # the worker processes' registration of the kernel below (kept alive while they run)


def _cpu_flash_attention(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)
    empty = query.new_empty(0)
    return out, lse, empty, empty, query.shape[2], key.shape[2], empty, empty, empty


def _ring_cases() -> dict:
    # diffusers' ring attention needs a backend that returns the log-sum-exp; on the CPU none does (its
    # "_native_flash" calls aten's flash attention, which has CUDA kernels only). These processes give that op a CPU
    # kernel from PyTorch's CPU flash attention, so that diffusers' own ring path runs here.
    global _FLASH_ON_CPU
    _FLASH_ON_CPU = torch.library.Library("aten", "IMPL")
    _FLASH_ON_CPU.impl("_scaled_dot_product_flash_attention", _cpu_flash_attention, "CPU")

    results = {"errors": {}}
    native = _tiny_dit()
    with pytest.raises(ValueError, match="log-sum-exp") as error:
        enable_context_parallel(native, kind="ring")
    results["errors"]["native backend"] = str(error.value)
    sparse = attention.apply(_tiny_dit(), "vmoba", block_size=8)
    with pytest.raises(ValueError, match="Ulysses") as error:
        enable_context_parallel(sparse, kind="ring")
    results["errors"]["sparse method"] = str(error.value)

    reference, ring = _tiny_dit(), _tiny_dit()
    attention.apply(ring, "dense")
    ring.set_attention_backend("_native_flash")
    enable_context_parallel(ring, kind="ring")
    results["dense"] = dict(split=_run(ring), reference=_run(reference))
    attention.apply(ring, "vmoba", block_size=8)  # applied after enabling: refused at the call
    with pytest.raises(ValueError, match="Ulysses") as error:
        _run(ring)
    results["errors"]["sparse method at the call"] = str(error.value)
    return results


def _model_errors() -> dict:
    errors = {}
    three_heads = VideoDiT(**dict(TINY_DIT, num_attention_heads=3))
    for name, model in {"three heads": three_heads, "block model": block_model_from(VideoDiT(**TINY_DIT), window_chunks=1)}.items():
        with pytest.raises(ValueError) as error:
            enable_context_parallel(model)
        errors[name] = str(error.value)
    return errors


def _tiny_pipeline() -> TextToVideoPipeline:
    # Every positional option of the embedded model, so that the per-token modulation is split too.
    transformer = randomised(VideoDiT(**TINY_DIT, absolute_positions=True, frame_modulation=True,
                                      position_modulation=True, caption_layout=True))
    text_encoder = randomised(TextEncoder(vocab=vocabulary(), **TINY_TEXT))
    pipe = TextToVideoPipeline(text_encoder=text_encoder, transformer=transformer,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                               guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    return pipe("a red circle moves to the right on black", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


def _pipeline_cases() -> dict:
    results = {}
    for method in (None, "vmoba"):
        reference, split = _tiny_pipeline(), _tiny_pipeline()
        enable_context_parallel(split)
        if method is not None:
            attention.apply(reference.transformer, method, block_size=8)
            attention.apply(split.transformer, method, block_size=8)
        results[method or "own attention"] = dict(split=_generate(split), reference=_generate(reference))
    return results


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        results = dict(methods=attention.available_methods(), ulysses=_ulysses_cases(), gradients=_gradient_case(),
                       ring=_ring_cases(), model_errors=_model_errors(), pipeline=_pipeline_cases())
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("context_parallel")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=RANKS)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]


def _assert_same(pair: dict) -> None:
    torch.testing.assert_close(pair["split"], pair["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_ulysses_gives_what_one_process_gives(ranks, case):
    for rank in ranks:
        _assert_same(rank["ulysses"][case])


def test_every_registered_method_runs_under_ulysses(ranks):
    assert set(ranks[0]["methods"]) <= {method for method, _ in CASES.values()}


def test_the_layout_describes_the_whole_video_while_each_rank_holds_half_of_it(ranks):
    for rank in ranks:
        assert rank["ulysses"]["layout_grid"] == GRID
        assert rank["ulysses"]["local_tokens"] == {GRID[0] * GRID[1] * GRID[2] // RANKS}


def test_a_method_that_drops_blocks_still_gives_its_one_process_output(ranks):
    # Selecting blocks per rank (a layout of one rank's tokens) would select other blocks, and differ.
    for rank in ranks:
        case = rank["ulysses"]["vmoba-half-the-blocks"]
        assert case["split_density"] == pytest.approx(case["reference_density"])
        assert case["split_density"] < 0.75
        assert (case["reference"] - rank["ulysses"]["dense"]["reference"]).abs().max() > 1e-2
        _assert_same(case)


def test_gradients_flow_back_through_the_exchange(ranks):
    for rank in ranks:
        grads = rank["gradients"]
        scale = grads["reference"].abs().max()
        torch.testing.assert_close(grads["split"], grads["reference"], rtol=1e-5, atol=1e-5 * scale)


def test_a_token_count_that_does_not_split_evenly_is_refused_before_generating(ranks):
    assert "27 tokens, which do not split evenly across the 2 ranks" in ranks[0]["ulysses"]["uneven_error"]


def test_ring_dense_goes_through_diffusers_ring_attention(ranks):
    for rank in ranks:
        _assert_same(rank["ring"]["dense"])


def test_ring_refuses_sparse_methods_and_the_native_backend(ranks):
    errors = ranks[0]["ring"]["errors"]
    assert "'vmoba' cannot run under ring attention" in errors["sparse method"]
    assert "'vmoba' cannot run under ring attention" in errors["sparse method at the call"]
    assert "'native' attention backend" in errors["native backend"]


def test_models_that_cannot_be_split_are_refused(ranks):
    errors = ranks[0]["model_errors"]
    assert "3 heads do not divide among 2 ranks" in errors["three heads"]
    assert "BlockVideoDiT (block diffusion) does not support context parallelism" in errors["block model"]


@pytest.mark.parametrize("attention_method", ["own attention", "vmoba"])
def test_a_generation_split_across_two_ranks_is_the_one_process_generation(ranks, attention_method):
    for rank in ranks:
        _assert_same(rank["pipeline"][attention_method])


def test_errors_without_a_world_to_split_across():
    model = _tiny_dit()
    with pytest.raises(ValueError, match="kind must be one of"):
        enable_context_parallel(model, kind="tensor")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        enable_context_parallel(model)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="this world has one"):
            enable_context_parallel(model)
    finally:
        dist.destroy_process_group()
    assert model._parallel_config is None
