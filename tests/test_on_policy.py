"""On-policy distillation: the states the student is trained on lie on the path the pipeline samples."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

from pipelines import TextToVideoPipeline
from t2v.data import vocabulary
from t2v.models import TextEncoder, VideoDiT
from t2v.training import TrainConfig, train
from t2v.training.on_policy import OnPolicyStates
from tiny_models import TINY_DIT, TINY_TEXT, randomised

CAPTIONS = ["a red circle moves to the left", "a blue square moves up on white", "a green triangle grows"]


def tiny_encoder_and_transformer():
    torch.manual_seed(0)
    encoder = TextEncoder(vocab=vocabulary(), **TINY_TEXT)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.2)
    return encoder.eval(), randomised(VideoDiT(**TINY_DIT))


def test_sampled_paths_are_the_pipelines_paths():
    encoder, transformer = tiny_encoder_and_transformer()
    scale, steps = 3.0, 5
    states = OnPolicyStates(1.0, 2 * len(CAPTIONS), scale, FlowMatchEulerDiscreteScheduler(shift=3.0), steps)
    inputs, times, ends, path = states.sample_paths(encoder, transformer, CAPTIONS, torch.Generator().manual_seed(0))
    assert len(inputs) == steps * len(CAPTIONS) and path.tolist() == list(range(len(CAPTIONS))) * steps

    pipe = TextToVideoPipeline(text_encoder=encoder, transformer=transformer,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                               guider=ClassifierFreeGuidance(guidance_scale=scale))
    pipe.set_progress_bar_config(disable=True)
    seen = []
    with torch.no_grad():
        out = pipe(CAPTIONS, num_inference_steps=steps, latents=inputs[: len(CAPTIONS)], output_type="latent",
                   callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {}).frames
    torch.testing.assert_close(ends, out, rtol=1e-4, atol=1e-4)
    for step in range(1, steps):  # each step's input is the pipeline's latents after the step before
        torch.testing.assert_close(inputs[step * len(CAPTIONS):(step + 1) * len(CAPTIONS)], seen[step - 1],
                                   rtol=1e-4, atol=1e-4)
    expected = pipe.scheduler.sigmas[:-1].repeat_interleave(len(CAPTIONS))
    torch.testing.assert_close(times, expected.float())
    assert not torch.allclose(ends[0], ends[1])  # the captions steer the paths apart


def test_stored_states_sit_on_the_trainers_path_and_keep_their_captions():
    encoder, transformer = tiny_encoder_and_transformer()
    states = OnPolicyStates(0.5, 8, 2.5, FlowMatchEulerDiscreteScheduler(shift=5.0), 4)
    generator = torch.Generator().manual_seed(1)
    states.refill(encoder, transformer, CAPTIONS + ["a yellow circle"], generator)
    assert states.states_per_batch == 4 and len(states.store["t"]) == 4 * 4  # 4 paths (batch // 2) of 4 steps
    data = torch.randn(8, 3, 4, 16, 16), ["x"] * 8, torch.rand(8), torch.randn(8, 3, 4, 16, 16)
    videos, captions, t, noise = states.mix_into(*data)
    # The rest of the batch is the data as it came.
    assert captions[4:] == ["x"] * 4 and torch.equal(t[4:], data[2][4:])
    assert torch.equal(videos[4:], data[0][4:]) and torch.equal(noise[4:], data[3][4:])
    rebuilt = (1 - t.view(-1, 1, 1, 1, 1)) * videos + t.view(-1, 1, 1, 1, 1) * noise
    # Each rebuilt state is one of the sampled inputs for its caption at its time, and its video that path's end.
    with torch.no_grad():
        again = states.sample_paths(encoder, transformer, CAPTIONS + ["a yellow circle"],
                                    torch.Generator().manual_seed(1))
    for i in range(4):
        match = [j for j in range(len(again[0])) if torch.allclose(again[0][j], rebuilt[i], atol=1e-4)]
        assert len(match) == 1, i
        j = match[0]
        assert (CAPTIONS + ["a yellow circle"])[again[3][j]] == captions[i] and again[1][j] == t[i]
        torch.testing.assert_close(videos[i], again[2][again[3][j]])
    for _ in range(3):  # four batches of 4 states use up the 16
        assert not states.needs_refill()
        states.mix_into(videos, captions, t, noise)
    assert states.needs_refill()
    with pytest.raises(ValueError, match="share"):
        OnPolicyStates(0.0, 8, 2.5, FlowMatchEulerDiscreteScheduler(), 4)
    with pytest.raises(ValueError, match="fewer than"):  # one path of one step cannot fill 2 clips of a batch
        OnPolicyStates(1.0, 2, 2.5, FlowMatchEulerDiscreteScheduler(), 1)
    with pytest.raises(ValueError, match="stochastic"):
        OnPolicyStates(0.5, 8, 2.5, FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), 4)
    # With guidance pairs only the first half of a batch is used, so the share counts from it.
    assert OnPolicyStates(0.5, 8, 2.5, FlowMatchEulerDiscreteScheduler(), 4, clips_used=4).states_per_batch == 2


def test_training_on_policy_feeds_the_student_its_own_states(tmp_path):
    encoder, transformer = tiny_encoder_and_transformer()
    init = tmp_path / "init"
    encoder.save_pretrained(init / "text_encoder")
    transformer.save_pretrained(init / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=4.0).save_pretrained(init / "scheduler")
    from t2v.training.trainer import FlowMatchingModule

    seen, forward = [], FlowMatchingModule.forward

    def recording(self, input_ids, text_mask, videos, t, noise, *rest):
        seen.append(dict(videos=videos, t=t, noise=noise))
        return forward(self, input_ids, text_mask, videos, t, noise, *rest)

    def run(name, **options):
        seen.clear()
        cfg = TrainConfig(output_dir=str(tmp_path / name), steps=2, batch_size=8, learning_rate=1e-4,
                          warmup_steps=1, log_every=1, save_every=1000, frames=4, height=16, width=16,
                          init_from=str(init), teacher_weight=1.0, attention="vmoba",
                          attention_options=dict(block_size=16, sparsity=0.5), on_policy_share=0.5,
                          on_policy_steps=3, **options)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(FlowMatchingModule, "forward", recording)
            train(cfg)
        return list(seen)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=4.0)  # the init's scheduler, not the training times' shift
    scheduler.set_timesteps(3)
    sigmas = scheduler.sigmas[:-1].float()

    def at_sampler_times(t):
        return [bool(torch.isclose(sigmas, x).any()) for x in t]

    for batch in run("plain"):  # half of each batch at the sampler's times, the rest drawn for noised data
        assert at_sampler_times(batch["t"]) == [True] * 4 + [False] * 4
        tt = batch["t"].view(-1, 1, 1, 1, 1)
        state = (1 - tt) * batch["videos"] + tt * batch["noise"]
        assert state[:4].abs().max() < 10 and batch["videos"][:4].std() > 0.1  # sampled clips, not placeholders
    # With guidance pairs the states are half of the clips used, each seen with and without its caption.
    for batch in run("pairs", distill_guidance_scale=2.5):
        assert at_sampler_times(batch["t"]) == [True, True, False, False] * 2
        assert torch.equal(batch["videos"][:4], batch["videos"][4:]) and torch.equal(batch["t"][:4], batch["t"][4:])
    with pytest.raises(ValueError, match="teacher_weight 1"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), init_from=str(init), attention="vmoba",
                          teacher_weight=0.5, on_policy_share=0.5))
