"""BroadWay guidance on DiTs (temporal self-guidance, Fourier motion enhancement), the cfg entry, and the registry."""

import json
import math

import imageio.v3 as iio
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

import attention
from pipelines import TextToVideoPipeline
from t2v.cli import main
from t2v.data import vocabulary
from t2v.guidance import available_guidance, get_guidance
from t2v.guidance.fourier_motion import high_pass, map_energy
from t2v.guidance.temporal_maps import (attention_with_frame_mass, frame_attention, frame_bias, frame_mass,
                                        frame_to_frame_map)
from t2v.models import TextEncoder, VideoDiT

PROMPT = "a red circle moves to the right on black"


def tiny_guidance_pipeline(**dit_options) -> TextToVideoPipeline:
    """A tiny random pipeline whose attention is far from uniform, so that edits of its maps show."""
    torch.manual_seed(0)
    transformer = VideoDiT(**dict(dict(num_attention_heads=2, attention_head_dim=16, num_layers=3, ffn_dim=64,
                                       text_dim=32, freq_dim=32, max_frames=8, max_height=16, max_width=16,
                                       sample_frames=4, sample_height=16, sample_width=16), **dit_options))
    text_encoder = TextEncoder(vocab=vocabulary(), hidden_size=32, num_layers=1, num_heads=2)
    with torch.no_grad():  # random weights: a new VideoDiT outputs zeros
        for p in [*transformer.parameters(), *text_encoder.parameters()]:
            p.normal_(0.0, 0.1)
        for block in transformer.blocks:  # larger q and k, so that attention is far from uniform
            block.attn1.norm_q.weight.fill_(2.0), block.attn1.norm_k.weight.fill_(2.0)
    transformer.eval(), text_encoder.eval()
    pipe = TextToVideoPipeline(text_encoder=text_encoder, transformer=transformer,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                               guider=ClassifierFreeGuidance(guidance_scale=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_guidance_pipeline()


def run(pipe, guidance=(), **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(PROMPT, guidance=list(guidance), generator=torch.Generator().manual_seed(0),
                output_type="latent", **kwargs).frames


def direct_frame_map(q, k, frames):
    """The frame-to-frame map from the full attention matrix, one frame pair at a time."""
    b, h, n, d = q.shape
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    per = n // frames
    out = torch.empty(b, h, frames, frames)
    for f in range(frames):
        for g in range(frames):
            out[:, :, f, g] = probs[:, :, f * per:(f + 1) * per, g * per:(g + 1) * per].sum(-1).mean(-1)
    return out


def test_frame_map_of_a_hand_made_case():
    # Each token's query and key are c times the one-hot of its frame: a query meets logit c^2 / sqrt(d) on the
    # keys of its own frame and 0 elsewhere, so A[f, f] = e / (e + frames - 1) with e = exp(c^2 / sqrt(d)).
    frames, per_frame, d, c = 3, 4, 4, 2.0
    frame = torch.arange(frames * per_frame) // per_frame
    x = (c * F.one_hot(frame, d).float()).expand(1, 2, -1, -1)
    e = math.exp(c * c / math.sqrt(d))
    expected = torch.full((frames, frames), 1 / (e + frames - 1)).fill_diagonal_(e / (e + frames - 1))
    torch.testing.assert_close(frame_to_frame_map(x, x, frames)[0, 1], expected)
    torch.testing.assert_close(direct_frame_map(x, x, frames)[0, 1], expected)
    # ...and a random case against the full attention matrix, for both ways of getting the masses.
    q, k = torch.randn(2, 3, 5 * 6, 8), torch.randn(2, 3, 5 * 6, 8)
    torch.testing.assert_close(frame_to_frame_map(q, k, 5), direct_frame_map(q, k, 5))
    _, mass = frame_attention(q, k, torch.randn(2, 3, 5 * 6, 8), 5)  # what the guided layers use
    torch.testing.assert_close(mass.view(2, 3, 5, 6, 5).mean(3), direct_frame_map(q, k, 5))


def test_edited_attention_is_the_log_bias_and_hits_the_target():
    torch.manual_seed(1)
    frames, (b, h, n, d) = 4, (2, 3, 4 * 6, 8)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mass = frame_mass(q, k, frames)
    target = torch.softmax(torch.randn(b, h, n, frames), dim=-1)
    bias = frame_bias(target, mass, frames)
    torch.testing.assert_close(attention_with_frame_mass(q, k, v, frames, target),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    torch.testing.assert_close(probs.view(b, h, n, frames, -1).sum(-1), target)  # masses are the target...
    within = probs.view(b, h, n, frames, -1) / target.unsqueeze(-1)  # ...and each frame's inner split is kept
    plain = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).view(b, h, n, frames, -1)
    torch.testing.assert_close(within, plain / mass.unsqueeze(-1))
    torch.testing.assert_close(attention_with_frame_mass(q, k, v, frames, mass),
                               F.scaled_dot_product_attention(q, k, v))
    # A frame whose target mass is zero (a Fourier edit can clamp one to 0) is shut out, not turned into NaN.
    shut = target.clone()
    shut[..., 0] = 0
    shut = shut / shut.sum(-1, keepdim=True)
    out = attention_with_frame_mass(q, k, v, frames, shut)
    per = n // frames
    only_rest = F.scaled_dot_product_attention(q[..., :, :], k[:, :, per:], v[:, :, per:],
                                               attn_mask=frame_bias(shut, mass, frames)[..., per:])
    torch.testing.assert_close(out, only_rest)


def test_fourier_edit_raises_energy_and_makes_up_for_self_guidance():
    torch.manual_seed(2)
    mass = torch.softmax(0.3 * torch.randn(2, 2, 8, 8), dim=-1)  # mild, as the models' maps are: nothing clipped
    torch.testing.assert_close(high_pass(8, 1), torch.eye(8) - 1 / 8)  # everything but the mean
    rows = torch.randn(5, 8)
    spectrum = torch.fft.rfft(rows, dim=-1)
    spectrum[..., :3] = 0
    torch.testing.assert_close(rows @ high_pass(8, 3), torch.fft.irfft(spectrum, n=8, dim=-1))
    fme = get_guidance("fourier-motion", strength=0.5)
    boosted = fme.edit(1, mass, mass, {})
    assert (map_energy(boosted) > map_energy(mass)).all()
    torch.testing.assert_close(boosted.sum(-1), torch.ones(2, 2, 8))
    flat = mass + 0.8 * (mass.mean(1, keepdim=True) - mass)  # a blend toward a mean lowers the energy...
    assert (map_energy(flat) < map_energy(mass)).all()
    restored = get_guidance("fourier-motion", strength=0.0).edit(1, flat, mass, {})
    torch.testing.assert_close(map_energy(restored), map_energy(mass))  # ...which beta_c restores
    assert fme.__class__(split=5).edit(1, mass, mass, {}) is mass  # no frequency above 4 along 8 frames


@pytest.mark.parametrize("names", [["temporal-self-guidance"], ["fourier-motion"],
                                   ["temporal-self-guidance", "fourier-motion"]])
def test_strength_zero_is_bitwise_unguided_and_nonzero_changes_the_video(pipe, names):
    processors = [block.attn1.processor for block in pipe.transformer.blocks]
    plain = run(pipe)
    zero = run(pipe, [get_guidance(name, strength=0.0) for name in names])
    assert torch.equal(zero, plain)
    # Installed but acting at no step: the wrappers pass every call through untouched.
    assert torch.equal(run(pipe, [get_guidance(name, steps=[7]) for name in names]), plain)
    guided = run(pipe, [get_guidance(name, strength=0.9, steps=1.0) for name in names])
    assert (guided - plain).abs().max() > 1e-3
    assert [block.attn1.processor for block in pipe.transformer.blocks] == processors


def test_composes_with_an_attention_method(pipe):
    tsg = dict(strength=0.9, steps=1.0)
    guided = run(pipe, [get_guidance("temporal-self-guidance", **tsg)])
    attention.apply(pipe.transformer, "dense")
    try:
        applied = [block.attn1.processor for block in pipe.transformer.blocks]
        torch.testing.assert_close(run(pipe, [get_guidance("temporal-self-guidance", **tsg)]), guided)
        assert [block.attn1.processor for block in pipe.transformer.blocks] == applied
        assert attention.current_method(pipe.transformer) == "dense"
    finally:
        attention.remove(pipe.transformer)


def test_sparse_calls_are_skipped_or_computed_densely(pipe):
    # Any method other than "dense" counts as sparse; this one is dense attention under another name.
    attention.register_method("stand-in-sparse", lambda q, k, v, layout: F.scaled_dot_product_attention(q, k, v))
    attention.apply(pipe.transformer, "stand-in-sparse")
    try:
        plain = run(pipe)
        tsg = dict(strength=0.9, steps=1.0)
        assert torch.equal(run(pipe, [get_guidance("temporal-self-guidance", **tsg)]), plain)
        dense = run(pipe, [get_guidance("temporal-self-guidance", sparse_calls="dense", **tsg)])
        assert (dense - plain).abs().max() > 1e-3
    finally:
        attention.remove(pipe.transformer)
        attention.unregister_method("stand-in-sparse")


def test_temporal_neighbour_mean_and_the_score_edit():
    from t2v.guidance.temporal_self_guidance import temporal_neighbour_mean

    tiles = torch.tensor([[f, h, w] for f in range(3) for h in range(2) for w in range(2)])  # 3 tile frames of 2 x 2
    mean = temporal_neighbour_mean(tiles)
    torch.testing.assert_close(mean.sum(1), torch.ones(12))
    assert mean[0, 0] == mean[0, 4] == 0.5 and mean[4, 0] == mean[4, 4] == mean[4, 8] == pytest.approx(1 / 3)
    assert mean[0].count_nonzero() == 2 and mean[5, 4] == 0  # same frame, other place: not a neighbour
    scores = torch.rand(2, 3, 12, 7)
    tsg = get_guidance("temporal-self-guidance", sparse_calls="scores", strength=0.4)
    expected = scores + 0.4 * (torch.einsum("ij,bhjk->bhik", mean, scores) - scores)
    torch.testing.assert_close(tsg.edit_scores(scores, tiles), expected)
    with pytest.raises(ValueError, match="sparse_calls"):
        get_guidance("fourier-motion", sparse_calls="scores")


@pytest.mark.parametrize("method", ["xattention", "vmoba"])
def test_score_guidance_keeps_sparse_calls_sparse_at_their_density(pipe, method):
    from attention.methods.block_sparse import editing_block_scores, method_density

    attention.apply(pipe.transformer, method, block_size=8, sparsity=0.75)
    try:
        plain = run(pipe)
        plain_density = method_density(pipe.transformer)
        tsg = dict(strength=0.9, steps=1.0, sparse_calls="scores")
        guided = run(pipe, [get_guidance("temporal-self-guidance", **tsg)])
        assert (guided - plain).abs().max() > 1e-4  # other blocks were selected
        # As many of them, up to the own block (kept whatever its rank) falling out of the top more or less often.
        assert method_density(pipe.transformer) == pytest.approx(plain_density, abs=0.01)
        assert torch.equal(run(pipe, [get_guidance("temporal-self-guidance", **dict(tsg, strength=0.0))]), plain)
        seen = []
        with editing_block_scores(lambda scores, tiles: seen.append((scores.shape, tiles.shape)) or scores):
            assert torch.equal(run(pipe), plain)  # an identity edit changes nothing
        nqb = seen[0][0][2]
        assert seen and all(s[2] == t[0] == nqb and t[1] == 3 for s, t in seen)
    finally:
        attention.remove(pipe.transformer)


def test_cfg_entry_sets_the_scale_and_restores_the_guider(pipe):
    guider = pipe.guider
    torch.testing.assert_close(run(pipe, [get_guidance("cfg", scale=2.0)]), run(pipe, guidance_scale=2.0))
    assert pipe.guider is guider and pipe.guider.guidance_scale == 5.0
    assert torch.equal(run(pipe, [get_guidance("cfg")]), run(pipe))
    with pytest.raises(ValueError, match="unknown option.*guidance_rescale"):
        get_guidance("cfg", rescale=0.7)


def test_bad_settings_are_errors(pipe):
    registered = "cfg, fourier-motion, position-interpolation, temporal-self-guidance"
    with pytest.raises(ValueError, match=f"registered guidance methods: {registered}"):
        get_guidance("no-such-guidance")
    assert {"cfg", "fourier-motion", "temporal-self-guidance"} <= set(available_guidance())
    with pytest.raises(ValueError, match=r"layers \[0, 1\] do not come after the reference layer 1"):
        run(pipe, [get_guidance("temporal-self-guidance", layers=[0, 1, 2])])
    processors = [block.attn1.processor for block in pipe.transformer.blocks]
    with pytest.raises(ValueError, match="out of range"):  # the first one was installed, and is undone
        run(pipe, [get_guidance("temporal-self-guidance"), get_guidance("fourier-motion", layers=[5])])
    assert [block.attn1.processor for block in pipe.transformer.blocks] == processors
    with pytest.raises(ValueError, match="strength"):
        get_guidance("temporal-self-guidance", strength=1.5)


def test_cli_guidance_with_options(tmp_path, capsys):
    out = tmp_path / "guided.mp4"
    code = main(["generate", PROMPT, "-o", str(out), "--steps", "1", "--frames", "4",
                 "--guidance", "temporal-self-guidance", "--guidance-option", "temporal-self-guidance.strength=0.3",
                 "--guidance", "fourier-motion", "--guidance-option", "fourier-motion.split=2"])
    assert code == 0, capsys.readouterr().err
    assert iio.imread(out).shape[0] == 4
    code = main(["generate", PROMPT, "-o", str(out), "--guidance", "fourier-motion",
                 "--guidance-option", "cfg.scale=2"])
    assert code == 2 and "which no --guidance names" in capsys.readouterr().err



def test_failed_call_leaves_the_model_as_it_was(pipe):
    processors, guider = [block.attn1.processor for block in pipe.transformer.blocks], pipe.guider

    def stop(*args):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run(pipe, [get_guidance("cfg", scale=2.0), get_guidance("temporal-self-guidance", steps=1.0)],
            callback_on_step_end=stop)
    assert [block.attn1.processor for block in pipe.transformer.blocks] == processors and pipe.guider is guider
    assert not hasattr(pipe.transformer, "_temporal_map_controller")


def test_guidance_eval_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "guidance_eval.py"
    spec = importlib.util.spec_from_file_location("guidance_eval_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "eval.json"
    script.main(["--prompts", "1", "--seeds", "1", "--steps", "1", "--device", "cpu", "--settings", "none,tsg+fme",
                 "--option", "fourier-motion.split=2", "--json", str(out)])
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"none", "tsg+fme"} and record["options"] == {"fourier-motion": {"split": 2}}
    both = record["results"]["tsg+fme"]
    assert both["guidance"]["fourier-motion"]["split"] == 2 and both["clips"] == 1
    assert {"flicker", "motion_px", "travel_px", "accuracy", "seconds_per_clip", "overhead"} <= set(both)
    assert "tsg+fme" in capsys.readouterr().out
