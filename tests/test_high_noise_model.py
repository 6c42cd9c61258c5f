"""The pipeline's optional high-noise model: the steps at or above the boundary run it, on its own text encoder's
embeddings; load_pipeline attaches the one a fine-tuned folder names."""

import json
import shutil

import pytest
import torch

import attention
from pipelines import load_pipeline
from pipelines.loading import TRAINED_ATTENTION_FILE, trained_high_noise_model
from test_pipeline import PROMPT, tiny_pipeline

STEPS = 6


def other_models(pipe, seed=1, same_text_encoder=False):
    """A transformer (and text encoder) of the same shapes as the pipeline's, with other random weights."""
    twin = tiny_pipeline()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in twin.transformer.parameters():
            p.normal_(0.0, 0.1)
        if not same_text_encoder:
            for p in twin.text_encoder.parameters():
                p.normal_(0.0, 0.1)
    return twin.transformer, pipe.text_encoder if same_text_encoder else twin.text_encoder


def run(pipe, **kwargs):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="pt",
                **kwargs).frames


def test_steps_at_or_above_the_boundary_run_the_high_noise_model():
    pipe = tiny_pipeline()
    lead, encoder = other_models(pipe, same_text_encoder=True)
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps
    k = 2  # a boundary between the 2nd and 3rd timesteps
    ratio = float(timesteps[k - 1] + timesteps[k]) / 2 / pipe.scheduler.config.num_train_timesteps
    own = pipe.transformer

    # The reference: the high-noise model runs as the pipeline's transformer until a callback swaps the own one in.
    def swap(p, i, t, kwargs):
        if i == k - 1:
            p.transformer = own
        return kwargs

    pipe.transformer = lead
    reference = run(pipe, callback_on_step_end=swap)
    assert pipe.transformer is own
    alone = run(pipe)
    pipe.set_high_noise_model(lead, encoder, ratio)
    assert pipe.high_noise_steps(timesteps) == k
    torch.testing.assert_close(run(pipe), reference, rtol=0, atol=0)
    assert (run(pipe) - alone).abs().max() > 1e-3  # the high-noise steps changed the clip
    assert pipe.transformer is own and pipe.text_encoder is encoder  # put back after the call
    pipe.set_high_noise_model(None)
    assert pipe.high_noise_steps(timesteps) == 0 and pipe.config.boundary_ratio is None
    torch.testing.assert_close(run(pipe), alone, rtol=0, atol=0)


def test_each_model_gets_its_own_text_encoders_embeddings():
    pipe = tiny_pipeline()
    lead, lead_encoder = other_models(pipe)
    pipe.set_high_noise_model(lead, lead_encoder, 0.5)
    seen = {"lead": [], "own": []}

    def recorder(name):
        def hook(module, args, kwargs):
            seen[name].append(kwargs["encoder_hidden_states"][:1].clone())
        return hook

    hooks = [lead.register_forward_pre_hook(recorder("lead"), with_kwargs=True),
             pipe.transformer.register_forward_pre_hook(recorder("own"), with_kwargs=True)]
    try:
        run(pipe)
    finally:
        for h in hooks:
            h.remove()
    pipe.scheduler.set_timesteps(STEPS)
    k = pipe.high_noise_steps(pipe.scheduler.timesteps)
    assert 0 < k < STEPS and len(seen["lead"]) == 2 * k and len(seen["own"]) == 2 * (STEPS - k)  # two CFG branches
    for name, encoder in (("lead", lead_encoder), ("own", pipe.text_encoder)):
        expected = encoder.encode([PROMPT], device="cpu")[0]
        torch.testing.assert_close(seen[name][0], expected)  # the conditional branch comes first
    assert not torch.allclose(seen["lead"][0], seen["own"][0])


def test_a_high_noise_model_is_checked():
    pipe = tiny_pipeline()
    lead, encoder = other_models(pipe)
    with pytest.raises(ValueError, match="needs its text encoder and a boundary_ratio"):
        pipe.set_high_noise_model(lead, None, 0.9)
    with pytest.raises(ValueError, match=r"boundary_ratio must be in \(0, 1\]"):
        pipe.set_high_noise_model(lead, encoder, 1.5)
    other = tiny_pipeline()
    other.transformer.register_to_config(sample_frames=8)
    with pytest.raises(ValueError, match="differs from the pipeline's in sample_frames"):
        pipe.set_high_noise_model(other.transformer, encoder, 0.9)


def test_save_and_load_keep_the_high_noise_model(tmp_path):
    pipe = tiny_pipeline()
    lead, encoder = other_models(pipe)
    pipe.set_high_noise_model(lead, encoder, 0.5)
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "two")
    loaded = load_pipeline(tmp_path / "two", device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.boundary_ratio == 0.5 and loaded.high_noise_transformer is not None
    torch.testing.assert_close(run(loaded), expected)


def test_load_pipeline_attaches_the_high_noise_model_a_folder_names(tmp_path):
    dense = tiny_pipeline()
    dense.save_pretrained(tmp_path / "dense")
    variant = tiny_pipeline()
    variant.transformer, variant.text_encoder = other_models(variant)
    variant.save_pretrained(tmp_path / "variant")
    config = {"method": "vmoba", "options": {"block_size": 16},
              "high_noise_model": {"model": str(tmp_path / "dense"), "boundary_ratio": 0.5}}
    (tmp_path / "variant" / TRAINED_ATTENTION_FILE).write_text(json.dumps(config))
    assert trained_high_noise_model(tmp_path / "variant") == (str(tmp_path / "dense"), 0.5)
    assert trained_high_noise_model(tmp_path / "dense") is None

    pipe = load_pipeline(tmp_path / "variant", device="cpu")
    assert pipe.config.boundary_ratio == 0.5
    assert attention.current_method(pipe.transformer) == "vmoba"
    assert attention.current_method(pipe.high_noise_transformer) is None  # the dense model's own attention
    torch.testing.assert_close(pipe.high_noise_transformer.proj_out.weight, dense.transformer.proj_out.weight)
    named = load_pipeline(tmp_path / "variant", attention="vmoba", device="cpu")  # a named method runs alone
    assert named.high_noise_transformer is None and named.config.boundary_ratio is None

    shutil.rmtree(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="unknown model"):
        load_pipeline(tmp_path / "variant", device="cpu")
    (tmp_path / "variant" / TRAINED_ATTENTION_FILE).write_text(json.dumps({**config, "high_noise_model": "x"}))
    with pytest.raises(ValueError, match="cannot read"):
        load_pipeline(tmp_path / "variant", device="cpu")
