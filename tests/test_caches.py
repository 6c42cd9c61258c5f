"""Step caches (`pipelines.caches`): every cache on a tiny random pipeline skips work at an aggressive setting and
changes nothing at its strictest, alone and with an attention method installed before or after it; diffusers' Wan,
HunyuanVideo and CogVideoX transformers take the caches their pipelines can drive; the errors; load_pipeline, the
CLI and the batch script."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import (CogVideoXTransformer3DModel, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel,
                       WanTransformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.models.embeddings import get_3d_rotary_pos_embed

import attention
from pipelines import TextToVideoPipeline, load_pipeline
from pipelines.caches import (available_caches, calibrate_mag_ratios, install_cache, installed_cache, remove_cache,
                              stored_mag_ratios)
from t2v import default_model_path
from t2v.cli import main as t2v_main
from t2v.data import vocabulary
from t2v.guidance import get_guidance
from t2v.models import TextEncoder, VideoDiT
from t2v.models.block_dit import block_model_from
from t2v.models.mate_dit import mate_model_from
from tiny_models import TINY_DIT, TINY_TEXT, randomised

pytestmark = [pytest.mark.filterwarnings("ignore:block-sparse attention. no Triton kernel"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # torch.meshgrid's indexing note (FasterCache)

PROMPT = "a red circle moves to the right on black"
STEPS = 6
# Each cache at its strictest (it computes everything) and at an aggressive setting (it skips from the start).
STRICTEST = {"first-block": dict(threshold=0.0), "mag": dict(max_skip_steps=0, mag_ratios=[1.0] * STEPS),
             "taylorseer": dict(cache_interval=1), "sea": dict(threshold=0.0),
             "faster": dict(spatial_attention_block_skip_range=1, unconditional_batch_skip_range=1),
             "pyramid-attention": dict(spatial_attention_block_skip_range=1)}
ALL_TIMESTEPS = (-1, 901)  # every step but the first (timestep 950 or 1000 here)
AGGRESSIVE = {"first-block": dict(threshold=10.0),
              "mag": dict(threshold=10.0, retention_ratio=0.0, mag_ratios=[1.0] * STEPS),
              "taylorseer": dict(cache_interval=2, disable_cache_before_step=2), "sea": dict(threshold=10.0),
              "faster": dict(spatial_attention_timestep_skip_range=ALL_TIMESTEPS,
                             unconditional_batch_timestep_skip_range=ALL_TIMESTEPS),
              "pyramid-attention": dict(spatial_attention_timestep_skip_range=ALL_TIMESTEPS)}


def _tiny_pipeline(transformer=None) -> TextToVideoPipeline:
    text_encoder = randomised(TextEncoder(vocab=vocabulary(), **TINY_TEXT))
    pipe = TextToVideoPipeline(text_encoder=text_encoder, transformer=transformer or randomised(VideoDiT(**TINY_DIT)),
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                               guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SelfAttentionCounter:
    """Counts the videos whose self-attention a model computes (a batch of two counts two): the work a cache saves."""

    def __init__(self, transformer):
        self.count = 0
        for module in _self_attention(transformer):
            module.to_q.register_forward_hook(self._seen)

    def _seen(self, module, args, output):
        self.count += args[0].shape[0]


def _self_attention(transformer) -> list:
    if isinstance(transformer, HunyuanVideoTransformer3DModel):
        return [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    if isinstance(transformer, CogVideoXTransformer3DModel):
        return [block.attn1 for block in transformer.transformer_blocks]
    return [getattr(block.attn1, "temporal", block.attn1) for block in transformer.blocks]  # MATE: its TE-branch


def _generate(pipe, counter, **kwargs):
    counter.count = 0
    kwargs.setdefault("num_inference_steps", STEPS)
    latents = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).frames
    return latents, counter.count


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipeline()


@pytest.fixture(scope="module")
def counter(pipe):
    return SelfAttentionCounter(pipe.transformer)


@pytest.fixture(scope="module")
def reference(pipe, counter):
    return _generate(pipe, counter)


def _assert_strictest_is_a_no_op_and_aggressive_skips(pipe, counter, reference, name):
    expected, full_work = reference
    try:
        install_cache(pipe.transformer, name, **STRICTEST[name])
        latents, work = _generate(pipe, counter)
        assert work == full_work
        # pyramid-attention and faster batch the two guidance branches into one call: rounding may differ.
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
        install_cache(pipe.transformer, name, **AGGRESSIVE[name])
        latents, work = _generate(pipe, counter)
        assert work < 0.8 * full_work
        assert (latents - expected).abs().max() > 1e-3
    finally:
        remove_cache(pipe.transformer)


@pytest.mark.parametrize("name", available_caches())
def test_each_cache_skips_work_and_changes_nothing_at_its_strictest(pipe, counter, reference, name):
    _assert_strictest_is_a_no_op_and_aggressive_skips(pipe, counter, reference, name)
    latents, work = _generate(pipe, counter)  # removed: the model is itself again
    assert work == reference[1]
    torch.testing.assert_close(latents, reference[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", available_caches())
@pytest.mark.parametrize("method_first", [True, False], ids=["method-then-cache", "cache-then-method"])
def test_caches_compose_with_an_attention_method_in_either_order(pipe, counter, name, method_first):
    method = dict(method="vmoba", block_size=8, sparsity=0.5)  # 64 tokens: 8 blocks, half of them kept
    try:
        attention.apply(pipe.transformer, **method)
        with_method = _generate(pipe, counter)
        if method_first:
            _assert_strictest_is_a_no_op_and_aggressive_skips(pipe, counter, with_method, name)
        else:
            attention.remove(pipe.transformer)
            install_cache(pipe.transformer, name, **STRICTEST[name])
            attention.apply(pipe.transformer, **method)
            latents, work = _generate(pipe, counter)
            assert work == with_method[1]
            torch.testing.assert_close(latents, with_method[0], rtol=0, atol=1e-5)
            install_cache(pipe.transformer, name, **AGGRESSIVE[name])  # a cache replaced under the method
            assert attention.current_method(pipe.transformer) == "vmoba"
            latents, work = _generate(pipe, counter)
            assert work < 0.8 * with_method[1] and (latents - with_method[0]).abs().max() > 1e-3
    finally:
        remove_cache(pipe.transformer)
        attention.remove(pipe.transformer)


def test_a_generation_after_an_interrupted_one_starts_fresh(pipe, counter, reference):
    install_cache(pipe.transformer, "first-block", threshold=10.0)
    try:
        expected = _generate(pipe, counter)

        def interrupt(pipe, step, timestep, tensors):
            if step == 2:
                raise KeyboardInterrupt
            return tensors

        with pytest.raises(KeyboardInterrupt):
            _generate(pipe, counter, callback_on_step_end=interrupt)
        torch.testing.assert_close(_generate(pipe, counter)[0], expected[0], rtol=0, atol=0)
    finally:
        remove_cache(pipe.transformer)


def test_mag_follows_the_number_of_steps_of_each_call(pipe, counter):
    install_cache(pipe.transformer, "mag", mag_ratios=[1.0, 0.99, 0.98, 0.97], num_inference_steps=4)
    try:
        _generate(pipe, counter, num_inference_steps=STEPS)
        assert pipe.transformer._cache_config.num_inference_steps == STEPS
        assert len(pipe.transformer._cache_config.mag_ratios) == STEPS
    finally:
        remove_cache(pipe.transformer)


def test_one_call_caches_refuse_what_cannot_share_a_call(pipe, counter):
    install_cache(pipe.transformer, "faster")
    try:
        with pytest.raises(ValueError, match="needs classifier-free guidance at every step"):
            _generate(pipe, counter, guidance_scale=1.0)
        with pytest.raises(ValueError, match="TemporalSelfGuidance|runs the guidance branches in one call"):
            _generate(pipe, counter, guidance=[get_guidance("temporal-self-guidance")])
    finally:
        remove_cache(pipe.transformer)


def test_mag_calibration_averages_every_prompt_and_branch(pipe):
    ratios = calibrate_mag_ratios(pipe, prompts=[PROMPT, "a blue square moves up on white"], num_inference_steps=4)
    assert len(ratios) == 4 and ratios[0] == 1.0 and all(0.1 < ratio < 10 for ratio in ratios)
    assert not pipe.transformer.is_cache_enabled


def test_the_embedded_model_ships_its_mag_ratios():
    transformer = VideoDiT.from_pretrained(default_model_path() / "transformer")
    ratios = stored_mag_ratios(transformer)
    assert len(ratios) == 25 and ratios[0] == 1.0
    install_cache(transformer, "mag")
    assert installed_cache(transformer) == "mag"
    assert torch.allclose(transformer._cache_config.mag_ratios, torch.tensor(ratios))


def test_errors_name_what_is_known_and_why_a_model_cannot_take_a_cache():
    model = randomised(VideoDiT(**TINY_DIT))
    with pytest.raises(ValueError, match="unknown cache 'teacache'; known caches: first-block, mag, taylorseer"):
        install_cache(model, "teacache")
    with pytest.raises(ValueError, match="does not take option.s. thresh; it takes: threshold"):
        install_cache(model, "first-block", thresh=0.1)
    with pytest.raises(ValueError, match="needs magnitude ratios calibrated for this model"):
        install_cache(model, "mag")
    block = block_model_from(model, window_chunks=1)
    for name in available_caches():
        with pytest.raises(ValueError, match="BlockVideoDiT: the block-diffusion model fills and reads a KV cache"):
            install_cache(block, name)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, patch_size=(1, 2, 2))
    for name in ("faster", "pyramid-attention"):
        with pytest.raises(ValueError, match="WanPipeline calls the transformer apart"):
            install_cache(wan, name)
    with pytest.raises(ValueError, match="step caches support this project's VideoDiT"):
        install_cache(TextEncoder(vocab=["a"], **TINY_TEXT), "first-block")
    assert installed_cache(model) is None and not model.is_cache_enabled


def test_the_mate_model_takes_every_cache():
    # Its blocks are Wan blocks whose self-attention module is the MATE mixer (TE-branch attention + Mamba branch).
    pipe = _tiny_pipeline(randomised(mate_model_from(VideoDiT(**TINY_DIT), mate_window=(2, 2, 2))))
    counter = SelfAttentionCounter(pipe.transformer)
    reference = _generate(pipe, counter)
    for name in available_caches():
        _assert_strictest_is_a_no_op_and_aggressive_skips(pipe, counter, reference, name)


# --- diffusers' transformers, driven the way their pipelines drive them --------------------------------------------

def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                  text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, patch_size=(1, 2, 2))
    text = torch.randn(2, 6, 16)
    # WanPipeline: one call per branch, each in its cache context.
    return randomised(model), torch.randn(1, 4, 3, 8, 8), [("cond", dict(encoder_hidden_states=text[:1])),
                                                           ("uncond", dict(encoder_hidden_states=text[1:]))]


def _hunyuan():
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1,
                                           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
                                           patch_size=2, patch_size_t=1)
    # HunyuanVideoPipeline: guidance-distilled, one call per step.
    branch = dict(encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3500.0]))
    return randomised(model), torch.randn(1, 4, 3, 8, 8), [("cond", branch)]


def _cogvideox():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=3, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=6,
                                        use_rotary_positional_embeddings=True)
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3)
    # CogVideoXPipeline: both branches in one batch, the unconditional first.
    branch = dict(encoder_hidden_states=torch.randn(2, 6, 16), image_rotary_emb=rotary)
    return randomised(model), torch.randn(1, 3, 4, 8, 8), [("cond_uncond", branch)]


def _denoise(model, latents, branches, counter):
    """A few Euler-like steps: every branch called at each step, in its cache context."""
    counter.count = 0
    for step, t in enumerate(torch.linspace(950, 50, STEPS)):
        velocity = 0
        for name, inputs in branches:
            batch = inputs["encoder_hidden_states"].shape[0]
            with model.cache_context(name, step_index=step, sigma=float(t) / 1000, num_inference_steps=STEPS), \
                    torch.no_grad():
                out = model(hidden_states=latents.repeat(batch, 1, 1, 1, 1), timestep=t.expand(batch),
                            return_dict=False, **inputs)[0]
            velocity = velocity + out.mean(0, keepdim=True)
        latents = latents - velocity / STEPS
    return latents, counter.count


REFUSED = {"wan": {"faster", "pyramid-attention"}, "hunyuan": {"sea"}, "cogvideox": {"sea"}}


@pytest.mark.parametrize("build", [_wan, _hunyuan, _cogvideox], ids=["wan", "hunyuan", "cogvideox"])
def test_diffusers_transformers_take_the_caches_their_pipelines_can_drive(build):
    model, latents, branches = build()
    kind = build.__name__[1:]
    counter = SelfAttentionCounter(model)
    expected, full_work = _denoise(model, latents, branches, counter)
    for name in available_caches():
        if name in REFUSED[kind]:
            with pytest.raises(ValueError, match=f"cache {name!r} cannot run on {type(model).__name__}"):
                install_cache(model, name)
            continue
        try:
            install_cache(model, name, **STRICTEST[name])
            latents_out, work = _denoise(model, latents, branches, counter)
            assert work == full_work, name
            torch.testing.assert_close(latents_out, expected, rtol=0, atol=1e-5)
            install_cache(model, name, **AGGRESSIVE[name])
            latents_out, work = _denoise(model, latents, branches, counter)
            assert work < 0.8 * full_work, name
            assert (latents_out - expected).abs().max() > 1e-4, name
        finally:
            remove_cache(model)


# --- load_pipeline, the CLI, the batch script --------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-pipeline")
    _tiny_pipeline().save_pretrained(path)
    return path


def test_load_pipeline_installs_the_cache(folder):
    pipe = load_pipeline(folder, device="cpu", cache="taylorseer", cache_options=dict(cache_interval=2))
    assert installed_cache(pipe.transformer) == "taylorseer"
    assert pipe.transformer._cache_config.cache_interval == 2
    pipe = load_pipeline(folder, device="cpu", attention="vmoba", block_size=8, cache="first-block")
    assert (installed_cache(pipe.transformer), attention.current_method(pipe.transformer)) == ("first-block", "vmoba")
    with pytest.raises(ValueError, match="unknown cache 'fast'; known caches: first-block"):
        load_pipeline(folder, device="cpu", cache="fast")
    with pytest.raises(ValueError, match="cache options .'threshold'. given without a cache"):
        load_pipeline(folder, device="cpu", cache_options=dict(threshold=0.1))


def test_cli_generate_with_a_cache(folder, tmp_path, capsys):
    common = ["generate", PROMPT, "--model", str(folder), "--steps", "4", "--device", "cpu"]
    assert t2v_main([*common, "-o", str(tmp_path / "plain.gif")]) == 0
    assert t2v_main([*common, "-o", str(tmp_path / "cached.gif"), "--cache", "first-block",
                     "--cache-option", "threshold=0"]) == 0
    assert (tmp_path / "cached.gif").read_bytes() == (tmp_path / "plain.gif").read_bytes()
    assert t2v_main([*common, "-o", str(tmp_path / "x.gif"), "--cache", "fast"]) == 2
    assert "unknown cache 'fast'; known caches: first-block, mag" in capsys.readouterr().err
    assert t2v_main([*common, "-o", str(tmp_path / "x.gif"), "--cache", "mag"]) == 2
    assert "needs magnitude ratios calibrated for this model" in capsys.readouterr().err
    assert t2v_main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "step caches" in listing and all(f"  {name}: " in listing for name in available_caches())


def test_generate_script_with_a_cache(folder, tmp_path):
    spec = importlib.util.spec_from_file_location("generate_script", Path(__file__).parents[1] / "scripts/generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    generate_main = script.main
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "steps": 3}) + "\n" + json.dumps({"prompt": PROMPT}) + "\n")
    out = tmp_path / "out"
    assert generate_main([str(prompts), "-o", str(out), "--model", str(folder), "--steps", "4", "--device", "cpu",
                          "--format", "gif", "--cache", "pyramid-attention",
                          "--cache-option", "spatial_attention_timestep_skip_range=[-1, 1001]"]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records] == ["ok", "ok"]
    assert generate_main([str(prompts), "-o", str(tmp_path / "bad"), "--cache", "fast"]) == 2
