"""TextToVideoPipeline end to end on a tiny random model, and load_pipeline / export_video."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

import attention
from pipelines import TextToVideoPipeline, export_video, load_pipeline
from t2v.data import vocabulary
from t2v.guidance import Guidance, register_guidance, unregister_guidance
from t2v.models import TextEncoder, VideoDiT

PROMPT = "a red circle moves to the right on black"
LONGER = "a small blue square slowly moves up on a white background"


def tiny_pipeline() -> TextToVideoPipeline:
    torch.manual_seed(0)
    transformer = VideoDiT(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, text_dim=32,
                           freq_dim=32, max_frames=8, max_height=16, max_width=16, sample_frames=4,
                           sample_height=16, sample_width=16)
    text_encoder = TextEncoder(vocab=vocabulary(), hidden_size=32, num_layers=1, num_heads=2)
    # A new VideoDiT outputs zeros (its residual gates start closed): random weights make every input matter.
    with torch.no_grad():
        for p in [*transformer.parameters(), *text_encoder.parameters()]:
            p.normal_(0.0, 0.1)
    transformer.eval(), text_encoder.eval()  # as from_pretrained leaves them (the encoder's eval path differs slightly)
    pipe = TextToVideoPipeline(text_encoder=text_encoder, transformer=transformer,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                               guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "pipeline"
    tiny_pipeline().save_pretrained(path)
    return path


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames


def test_output_types(pipe):
    frames = run(pipe)
    assert frames.shape == (1, 4, 16, 16, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0 and frames.std() > 0.01
    assert run(pipe, output_type="pt").shape == (1, 4, 3, 16, 16)
    pil = run(pipe, output_type="pil", num_videos_per_prompt=2)
    assert len(pil) == 2 and len(pil[0]) == 4 and pil[0][0].size == (16, 16)
    assert run(pipe, num_frames=6, height=8, width=12).shape == (1, 6, 8, 12, 3)


def test_batch_matches_separate_calls(pipe):
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    batch = pipe([PROMPT, LONGER], generator=generators, num_inference_steps=3).frames
    first, second = run(pipe, PROMPT, seed=1), run(pipe, LONGER, seed=2)
    np.testing.assert_allclose(batch[0], first[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], second[0], atol=1e-5)
    # ...and the comparison means something: another prompt with the same noise gives another video.
    assert np.abs(run(pipe, LONGER, seed=1) - first).max() > 1e-3


def test_callback_sees_every_step(pipe):
    steps = []

    def on_step(pipeline, i, t, kwargs):
        steps.append(i)
        assert kwargs["latents"].shape == (1, 3, 4, 16, 16)
        return kwargs

    run(pipe, num_inference_steps=4, callback_on_step_end=on_step)
    assert steps == [0, 1, 2, 3]


def test_save_and_load_round_trip(pipe, saved):
    loaded = TextToVideoPipeline.from_pretrained(saved)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(tiny_pipeline()), run(loaded))
    np.testing.assert_array_equal(run(pipe), run(load_pipeline(saved, device="cpu")))


def test_empty_prompt_is_an_error(pipe):
    with pytest.raises(ValueError, match="non-empty"):
        run(pipe, "")
    with pytest.raises(ValueError, match="non-empty"):
        run(pipe, [PROMPT, "   "])


def test_bad_frames_error_names_what_the_model_takes(pipe):
    with pytest.raises(ValueError, match=r"cannot take 9 frames.*up to 8"):
        run(pipe, num_frames=9)
    with pytest.raises(ValueError, match="multiple of 4"):
        run(pipe, height=10)


def test_unknown_word_warns_and_goes_on(pipe):
    with pytest.warns(UserWarning, match="blorp"):
        frames = run(pipe, "a red blorp moves up")
    assert frames.shape == (1, 4, 16, 16, 3)


class Brighten(Guidance):
    name = "brighten"

    def __init__(self):
        self.calls = 0

    def adjust_prediction(self, pipeline, step, timestep, noise_pred, latents):
        self.calls += 1
        return noise_pred - 0.5  # velocity is noise - clean: lowering it raises the clean estimate


def test_load_pipeline_options(saved):
    register_guidance("brighten", Brighten)
    try:
        pipe = load_pipeline(saved, attention="dense", guidance=["brighten"], device="cpu")
    finally:
        unregister_guidance("brighten")
    pipe.set_progress_bar_config(disable=True)
    assert attention.current_method(pipe.transformer) == "dense"
    assert pipe.transformer.dtype == torch.float32
    [brighten] = pipe.default_guidance
    guided, plain = run(pipe), run(pipe, guidance=[])
    assert brighten.calls == 3 and guided.mean() > plain.mean() + 0.05


def test_load_pipeline_bad_names(saved):
    with pytest.raises(ValueError, match="registered methods: .*dense"):
        load_pipeline(saved, attention="no-such-method")
    with pytest.raises(ValueError, match="unknown guidance method 'no-such-guidance'"):
        load_pipeline(saved, guidance=["no-such-guidance"])


def test_load_embedded_model():
    pipe = load_pipeline(None, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32
    assert run(pipe, num_inference_steps=2).shape == (1, 16, 32, 32, 3)


def test_embedded_model_moves_the_object_the_way_the_words_say_from_the_same_noise():
    # From one noise for all four captions, a model that ignored the direction word would draw one track for all.
    from t2v.eval import score_clip

    pipe = load_pipeline(None, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a red circle moves {way} on black" for way in ("to the left", "to the right", "up", "down")]
    generators = [torch.Generator().manual_seed(0) for _ in prompts]
    frames = pipe(prompts, generator=generators, num_inference_steps=20, output_type="np").frames
    for prompt, clip in zip(prompts, frames):
        result = score_clip(clip, prompt)
        assert result["motion"] and result["colour"], (prompt, result["reading"])


def test_a_fine_tuned_folder_loads_with_the_attention_it_was_trained_with(saved, tmp_path):
    from pipelines.loading import TRAINED_ATTENTION_FILE, trained_attention

    variant = tmp_path / "variant"
    shutil.copytree(saved, variant)
    (variant / TRAINED_ATTENTION_FILE).write_text(json.dumps({"method": "vmoba", "options": {"block_size": 16}}))
    assert trained_attention(variant) == ("vmoba", {"block_size": 16}) and trained_attention(saved) is None
    pipe = load_pipeline(variant, device="cpu")
    state = attention.adapter_state(pipe.transformer)
    assert state.method == "vmoba" and state.options["block_size"] == 16
    assert attention.current_method(load_pipeline(variant, attention="dense").transformer) == "dense"
    assert attention.current_method(load_pipeline(saved).transformer) is None  # plain folders: the model's own
    (variant / TRAINED_ATTENTION_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*attention_config.json"):
        load_pipeline(variant)


def test_measured_quality_reads_a_folders_quality_file(saved, tmp_path):
    from pipelines.loading import measured_quality
    from t2v import QUALITY_FILE

    assert measured_quality(saved) is None
    folder = tmp_path / "variant"
    folder.mkdir()
    quality = {"accuracy": 0.75, "of": "right in every attribute", "clips": 1200, "dense_accuracy": 0.8,
               "psnr": {"mean": 27.04, "median": 27.5, "under_20db": 0.0625, "under_10db": 0.0},
               "device": "a GPU", "date": "2026-01-01"}
    (folder / QUALITY_FILE).write_text(json.dumps(quality))
    line = measured_quality(folder)
    assert line.startswith("75.0% right in every attribute (1,200 held-out clips, the dense model 80.0%; 27.0 dB")
    assert "6.2% of clips under 20 dB, 0.0% under 10 dB; a GPU, 2026-01-01)" in line
    del quality["clips"]
    (folder / QUALITY_FILE).write_text(json.dumps(quality))
    with pytest.raises(ValueError, match="cannot read .*quality.json"):
        measured_quality(folder)


@pytest.mark.parametrize("name, method", [("t2v-tiny-vmoba", "vmoba"), ("t2v-tiny-rectified", "rectified")])
def test_a_shipped_variant_names_its_attention_and_runs_end_to_end(name, method):
    from pipelines import available_models
    from pipelines.loading import trained_attention

    assert trained_attention(available_models()[name])[0] == method
    tuned = load_pipeline(name, device="cpu")
    tuned.set_progress_bar_config(disable=True)
    assert attention.current_method(tuned.transformer) == method
    # The dense model it was distilled from runs the noisiest steps, where the clip's layout is decided.
    assert attention.current_method(tuned.high_noise_transformer) is None and tuned.config.boundary_ratio == 0.93
    assert run(tuned, num_inference_steps=2, num_frames=4).shape == (1, 4, 32, 32, 3)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model.*expected a pipeline folder"):
        load_pipeline(missing)


def test_other_pipeline_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="WanPipeline.*expected a pipeline folder"):
        load_pipeline(tmp_path)


def test_corrupt_weights_name_the_file(saved, tmp_path):
    broken = shutil.copytree(saved, tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match=r"broken/transformer/diffusion_pytorch_model\.safetensors"):
        load_pipeline(broken)


def test_export_video(tmp_path):
    frames = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    for name in ("clip.mp4", "clip.gif"):
        back = iio.imread(export_video(frames, tmp_path / "sub" / name))
        assert back.shape[:3] == (5, 256, 256)  # 32 pixels a side, enlarged 8 times
        assert np.abs(back[:, ::8, ::8, :3] / 255.0 - frames).mean() < 0.1
    assert iio.imread(export_video(frames, tmp_path / "small.mp4", scale=1)).shape == (5, 32, 32, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        export_video(frames, tmp_path / "clip.avi")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PermissionError, match="cannot write to folder"):
        export_video(frames, tmp_path / "a-file" / "clip.mp4")


def _diagnose_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_model.py"
    spec = importlib.util.spec_from_file_location("diagnose_model_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_reversal_probe_compares_true_and_reversed_captions_on_the_same_noisy_clips(pipe, monkeypatch):
    script = _diagnose_script()
    losses = script.reversal_losses(pipe, times=(0.9, 0.3), clips=6, batch_size=4)
    assert set(losses) == {0.9, 0.3}
    assert all(0 < true != reversed_ for true, reversed_ in losses.values())  # the tiny model reads its text
    monkeypatch.setattr(script, "REVERSED_MOTION", {m: m for m in script.REVERSED_MOTION})
    assert all(true == same for true, same in script.reversal_losses(pipe, times=(0.9,), clips=6).values())


def test_layout_probe_reads_travel_along_each_axis(pipe):
    script = _diagnose_script()
    clip = -torch.ones(1, 3, 4, 8, 10)  # black
    for frame, (x, y) in enumerate([(1, 6), (3, 5), (5, 4), (7, 3)]):
        clip[0, 0, frame, y, x] = 1.0  # a red pixel moving right and up
    dx, dy = script.red_mass_travel(clip)
    assert dx.item() == pytest.approx(6.0) and dy.item() == pytest.approx(-3.0)
    world = script.world_layout_travel(clips=16)  # the world's objects go the way their captions say
    assert world["right"] > 4 and world["left"] < -4 and world["down"] > 4 and world["up"] < -4
    travel = script.layout_travel(pipe, times=(1.0, 0.9), clips=2)
    assert set(travel) == {"left", "right", "up", "down"}
    assert all(len(values) == 2 and all(np.isfinite(values)) for values in travel.values())


def test_word_probe_sees_the_words_a_model_reads(pipe, monkeypatch):
    script = _diagnose_script()
    monkeypatch.setattr(script, "WORD_PAIRS", {"colour": (PROMPT, PROMPT.replace("red", "blue")),
                                               "none": (PROMPT, PROMPT)})
    changes = script.word_sensitivity(pipe, times=(0.9, 0.5), clips=2)
    assert changes["none"] == [0.0, 0.0]
    assert all(change > 1e-3 for change in changes["colour"])


def test_block_mass_probe_reports_the_mass_the_oracle_selection_keeps(pipe, monkeypatch):
    import attention
    from attention.methods import oracle
    from attention.methods.block_sparse import keep_top_fraction

    script = _diagnose_script()
    masses = []
    exact = oracle.exact_block_mass
    monkeypatch.setattr(oracle, "exact_block_mass", lambda *a: masses.append(exact(*a)) or masses[-1])
    result = script.block_mass(pipe, prompts=1, seeds=1, steps=2, batch_size=1)  # 64 tokens: 4 blocks of 16
    assert set(result) == {(layer, f) for layer in (0, 1) for f in script.KEPT_FRACTIONS}
    assert len(masses) == 2 * 2 * 2  # two layers, two steps, two calls a step (with and without the text)
    for f in script.KEPT_FRACTIONS:  # the same rows in every layer, so the layers' mean is the overall mean
        kept = torch.cat([(m * keep_top_fraction(m, f)).sum(-1).flatten() for m in masses])
        assert np.mean([result[layer, f][0] for layer in (0, 1)]) == pytest.approx(float(kept.mean()), rel=1e-5)
        assert np.mean([result[layer, f][1] for layer in (0, 1)]) == pytest.approx(float((kept < 0.75).float().mean()))
    assert 0.25 <= result[0, 0.25][0] < result[0, 0.5][0] <= 1.0  # the best of 4 blocks holds at least a quarter
    assert attention.current_method(pipe.transformer) is None  # the probe leaves the model's own attention
    assert "block-mass-probe" not in attention.available_methods()
