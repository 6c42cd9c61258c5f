import json

import pytest
import torch

from t2v.data import VideoWorld, vocabulary
from t2v.models import TextEncoder, VideoDiT
from t2v.training import TrainConfig, train
from tiny_models import TINY_DIT, TINY_TEXT, randomised



def test_video_dit_output_shape_and_dependence_on_text():
    model = randomised(VideoDiT(**TINY_DIT)).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    text = torch.randn(2, 5, 16)
    out = model(x, torch.tensor([10.0, 900.0]), text).sample
    assert out.shape == x.shape
    other = model(x, torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16)).sample
    assert (out - other).abs().max() > 1e-3


def test_video_dit_runs_in_bfloat16_close_to_float32():
    # Inference in bfloat16 (the default on CUDA) has no autocast to reconcile float32 conditioning with bf16 weights.
    model = randomised(VideoDiT(**TINY_DIT)).eval()
    x, t, text = torch.randn(2, 3, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16)
    reference = model(x, t, text).sample
    low = model.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16()).sample
    assert low.dtype == torch.bfloat16
    assert ((low.float() - reference).norm() / reference.norm()) < 0.05


def _grown_from_saved(trained: VideoDiT, tmp_path, **overrides) -> VideoDiT:
    """`trained` saved, then loaded for training with config overrides that add zero-initialised parameters."""
    from t2v.training.trainer import build_models

    trained.save_pretrained(tmp_path / "transformer")
    TextEncoder(vocab=vocabulary(), **TINY_TEXT).save_pretrained(tmp_path / "text_encoder")
    return build_models(TrainConfig(init_from=str(tmp_path), transformer=overrides))[1].eval()


def _close_every_block(model: VideoDiT) -> None:
    """Gates and modulation to zero, so that a token's own conditioning reaches it only through the output."""
    for block in model.blocks:
        block.scale_shift_table[:, 2].zero_()
        block.scale_shift_table[:, 5].zero_()
    model.time_modulation[1].weight.zero_()
    model.time_modulation[1].bias.zero_()


def test_absolute_positions_start_neutral_and_can_be_added_to_trained_weights(tmp_path):
    plain = randomised(VideoDiT(**TINY_DIT)).eval()
    with_positions = _grown_from_saved(plain, tmp_path, absolute_positions=True)
    assert with_positions.config.absolute_positions and with_positions.frame_embedding.shape == (8, 24)
    x, t, text = torch.randn(2, 3, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = plain(x, t, text).sample
        assert torch.equal(with_positions(x, t, text).sample, reference)  # zero at first: same function
        for table in (with_positions.frame_embedding, with_positions.row_embedding, with_positions.column_embedding):
            table.normal_()
            assert (with_positions(x, t, text).sample - reference).abs().max() > 1e-3
            reference = with_positions(x, t, text).sample


def test_frame_modulation_starts_neutral_and_modulates_each_frame_on_its_own(tmp_path):
    plain = randomised(VideoDiT(**TINY_DIT)).eval()
    framed = _grown_from_saved(plain, tmp_path, frame_modulation=True)
    assert framed.frame_modulation_embedding.shape == (8, 24)
    x, t, text = torch.randn(2, 3, 4, 16, 16), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = plain(x, t, text).sample
        torch.testing.assert_close(framed(x, t, text).sample, reference, rtol=1e-5, atol=1e-6)  # same function
        _close_every_block(framed)
        closed = framed(x, t, text).sample
        framed.frame_modulation_embedding[2].normal_()
        changed = (framed(x, t, text).sample - closed).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-3 and changed[[0, 1, 3]].max() == 0
    low = framed.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16()).sample
    assert low.dtype == torch.bfloat16 and low.shape == x.shape


def test_position_modulation_starts_neutral_and_modulates_each_token_on_its_own(tmp_path):
    framed = randomised(VideoDiT(**TINY_DIT, frame_modulation=True)).eval()
    placed = _grown_from_saved(framed, tmp_path, position_modulation=True)
    assert placed.row_modulation_embedding.shape == placed.column_modulation_embedding.shape == (4, 24)
    x, t, text = torch.randn(2, 3, 4, 16, 12), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(placed(x, t, text).sample, framed(x, t, text).sample, rtol=1e-5, atol=1e-6)
        _close_every_block(placed)
        closed = placed(x, t, text).sample
        placed.row_modulation_embedding[1].normal_()
        placed.column_modulation_embedding[2].normal_()
        changed = (placed(x, t, text).sample - closed).abs().amax(dim=(0, 1, 2))  # (height, width) in pixels
    touched = torch.zeros(16, 12, dtype=torch.bool)
    touched[4:8] = touched[:, 8:12] = True  # patch row 1 and patch column 2, 4 pixels a patch
    assert changed[touched].min() > 1e-4 and changed[~touched].max() == 0
    low = placed.to(torch.bfloat16)(x.bfloat16(), t, text.bfloat16()).sample
    assert low.dtype == torch.bfloat16 and low.shape == x.shape
    rows_only = randomised(VideoDiT(**TINY_DIT, position_modulation=True)).eval()  # without the frame term
    with torch.no_grad():
        rows_only.row_modulation_embedding.normal_()
        assert rows_only(x, t, text).sample.shape == x.shape


def test_caption_layout_starts_neutral_then_places_by_caption_frame_and_column(tmp_path):
    placed = randomised(VideoDiT(**TINY_DIT)).eval()
    laid_out = _grown_from_saved(placed, tmp_path, caption_layout=True)
    torch.manual_seed(1)
    x, t = torch.randn(2, 3, 4, 16, 12), torch.tensor([10.0, 900.0])
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(laid_out(x, t, text, mask).sample, placed(x, t, text, mask).sample)
        layout = laid_out.layout_prior
        layout.out_weight.normal_()
        context = torch.randn(2, 5, 24)
        prior = layout(context, mask, (4, 4, 3)).view(2, 4, 4, 3, 24)  # (B, frames, rows, columns, D)
        assert (prior[:, 0] - prior[:, 1]).abs().max() > 1e-3  # frames differ at the same place
        assert (prior[:, :, :, 0] - prior[:, :, :, 1]).abs().max() > 1e-3  # and columns in the same frame
        assert (prior[:, :, 0] - prior[:, :, 1]).abs().max() > 1e-3  # and rows
        assert (prior[0] - prior[1]).abs().max() > 1e-3  # and so do captions
        padded = context.clone()
        padded[0, 3:] = torch.randn(2, 24)  # tokens the mask drops do not count
        torch.testing.assert_close(layout(padded, mask, (4, 4, 3))[0], prior[0].reshape(-1, 24))
        empty = layout(context, torch.zeros(2, 5), (4, 4, 3))  # no tokens kept: attends to all, no NaN
        assert torch.isfinite(empty).all()
        assert (laid_out(x, t, text, mask).sample - placed(x, t, text, mask).sample).abs().max() > 1e-4


@pytest.mark.parametrize("frames,height,width", [(4, 15, 16), (9, 16, 16), (4, 16, 20), (0, 16, 16)])
def test_video_dit_rejects_shapes_it_cannot_take(frames, height, width):
    model = VideoDiT(**TINY_DIT)
    with pytest.raises(ValueError, match="it takes frames a multiple of 1 up to 8, height a multiple of 4"):
        model.check_video_shape(frames, height, width)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = randomised(VideoDiT(**TINY_DIT)).eval()
    encoder = randomised(TextEncoder(vocab=vocabulary(), **TINY_TEXT)).eval()
    model.save_pretrained(tmp_path / "transformer")
    encoder.save_pretrained(tmp_path / "text_encoder")
    model2 = VideoDiT.from_pretrained(tmp_path / "transformer").eval()
    encoder2 = TextEncoder.from_pretrained(tmp_path / "text_encoder").eval()
    ids, mask = encoder.tokenize(["a red circle moves to the right", "a blue box"])
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([500.0, 500.0]), encoder(ids, mask), mask).sample
        b = model2(x, torch.tensor([500.0, 500.0]), encoder2(ids, mask), mask).sample
    assert torch.equal(a, b)
    assert encoder2.tokens == encoder.tokens


def test_text_encoder_warns_on_unknown_words_and_goes_on():
    encoder = TextEncoder(vocab=vocabulary(), **TINY_TEXT)
    with pytest.warns(UserWarning, match="blorp"):
        ids, mask = encoder.tokenize("a red blorp moves right")
    assert ids.shape == (1, encoder.config.max_length) and mask.sum() == 6 and mask[0, :6].all()
    assert ids[0, 3].item() == encoder.token_ids["<unk>"]


def test_a_few_training_steps_lower_the_loss(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), steps=40, batch_size=8, learning_rate=2e-3, warmup_steps=5,
                      log_every=1, save_every=1000, frames=4, height=16, width=16,
                      transformer=TINY_DIT, text_encoder=TINY_TEXT)
    final = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert (final / "transformer" / "config.json").exists()
    # The world used for training is the same one the scorer is checked on.
    assert VideoWorld(4, 16, 16).sample(2, torch.Generator().manual_seed(0))[0].shape == (2, 3, 4, 16, 16)


def test_training_with_vmoba_runs_through_the_kernel_backward(tmp_path):
    import attention

    cfg = TrainConfig(output_dir=str(tmp_path), steps=3, batch_size=2, warmup_steps=1, log_every=1, save_every=1000,
                      frames=4, height=16, width=16, transformer=TINY_DIT, text_encoder=TINY_TEXT,
                      attention="vmoba", attention_options={"threshold": 0.3, "block_size": 16})
    final = train(cfg)
    assert (final / "transformer" / "config.json").exists()
    with pytest.raises(ValueError, match="registered"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), steps=1, transformer=TINY_DIT, text_encoder=TINY_TEXT,
                          frames=4, height=16, width=16, attention="no-such-method"))
    assert "vmoba" in attention.available_methods()


def test_training_times_are_shifted_toward_noise():
    from t2v.training.trainer import sample_timesteps

    plain = sample_timesteps(20000, torch.Generator().manual_seed(0), "cpu", shift=1.0, uniform_share=0.0)
    expected = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(plain, expected)
    shifted = sample_timesteps(20000, torch.Generator().manual_seed(0), "cpu", shift=3.0)
    assert 0 < shifted.min() and shifted.max() < 1
    assert abs(shifted.median().item() - 0.75) < 0.02  # the logit-normal median 0.5, moved to 3 * 0.5 / 2
    assert (shifted > 0.95).float().mean() > 10 * (plain > 0.95).float().mean()
    band = sample_timesteps(20000, torch.Generator().manual_seed(0), "cpu", shift=3.0, low=0.9)
    torch.testing.assert_close(band, 0.9 + 0.1 * shifted)  # the same draws, squeezed into the high-noise band


def test_a_time_budget_stops_training_with_a_checkpoint(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), steps=10000, batch_size=2, warmup_steps=1, save_every=100000,
                      max_minutes=1e-6, frames=4, height=16, width=16, transformer=TINY_DIT, text_encoder=TINY_TEXT)
    train(cfg)
    assert (tmp_path / "trained_steps.txt").read_text().strip() == "1"
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]


def test_export_writes_the_training_shift_and_the_attention_the_weights_were_fine_tuned_with(tmp_path):
    import importlib.util

    from pathlib import Path

    from pipelines.loading import trained_attention

    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("train_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    weights, exported = tmp_path / "run" / "ema", tmp_path / "pipeline"
    randomised(VideoDiT(**TINY_DIT)).save_pretrained(weights / "transformer")
    TextEncoder(vocab=vocabulary(), **TINY_TEXT).save_pretrained(weights / "text_encoder")
    config = tmp_path / "run" / "train_config.json"
    config.write_text(json.dumps({"timestep_shift": 5.0, "attention": "vmoba", "attention_options": {"block_size": 16}}))
    script.export_pipeline(weights, exported)
    assert trained_attention(exported) == ("vmoba", {"block_size": 16})
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["shift"] == 5.0
    config.write_text(json.dumps({"timestep_shift": 3.0}))  # dense weights exported into the same folder
    script.export_pipeline(weights, exported)
    assert trained_attention(exported) is None


def test_position_tables_get_their_own_learning_rate():
    from t2v.training.trainer import POSITION_TABLES, parameter_groups

    model = VideoDiT(**TINY_DIT, absolute_positions=True, frame_modulation=True, position_modulation=True)
    rest, tables = parameter_groups(model, TrainConfig(learning_rate=1e-3, position_lr_scale=10.0))
    assert tables["lr"] == pytest.approx(1e-2) and "lr" not in rest  # the rest take the optimizer's rate
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert sorted(names[id(p)] for p in tables["params"]) == sorted(POSITION_TABLES)
    assert len(rest["params"]) + len(tables["params"]) == len(names)
    assert len(parameter_groups(VideoDiT(**TINY_DIT), TrainConfig(position_lr_scale=10.0))) == 1  # no tables
    assert len(parameter_groups(model, TrainConfig())) == 1  # factor 1: one group, as before the option


def test_caption_attribute_targets_and_loss():
    from t2v.training.caption_attributes import ATTRIBUTE_VALUES, CaptionAttributeHead, attribute_targets

    captions = ["a red circle moves to the left quickly on black",
                "a blue square stays still and a red triangle grows slowly",
                "red ball sliding rightward"]  # no speed, no background: nothing to read them back from
    targets = attribute_targets(captions)
    stated = [{ATTRIBUTE_VALUES[i] for i in row.nonzero().flatten().tolist()} for row in targets]
    assert stated[0] == {"colour:red", "shape:circle", "motion:left", "speed:fast", "background:black"}
    assert stated[1] == {"colour:blue", "colour:red", "shape:square", "shape:triangle", "motion:still",
                         "motion:grow", "speed:slow"}
    assert stated[2] == {"colour:red", "shape:circle", "motion:right"}
    targets = targets[:2]
    head = CaptionAttributeHead(16)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    both = head(text, mask, targets, torch.tensor([1.0, 1.0]))
    first = head(text, mask, targets, torch.tensor([1.0, 0.0]))  # the second caption was dropped
    padded = text.clone()
    padded[0, 3:] = 5.0  # masked tokens do not count
    torch.testing.assert_close(head(padded, mask, targets, torch.tensor([1.0, 0.0])), first)
    pooled = text[0, :3].mean(0)
    logits = head.classifier(pooled)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[0])
    torch.testing.assert_close(first, expected)
    assert not torch.isclose(both, first)
    assert head(text, mask, targets, torch.zeros(2)) == 0


def test_foreground_weights_cover_the_object_and_a_one_pixel_ring():
    from t2v.training.foreground_weights import foreground_weights

    videos = torch.full((2, 3, 2, 8, 8), -1.0)
    videos[0, 0, :, 3:5, 2:5] = 0.8  # a red 2x3 object on black; clip 1 is all background
    videos[1] += 0.05 * torch.rand_like(videos[1])  # below the threshold: still background
    weights = foreground_weights(videos, 4.0)
    assert weights.shape == (2, 1, 2, 8, 8)
    ring = torch.zeros(8, 8, dtype=torch.bool)
    ring[2:6, 1:6] = True
    near, far = weights[0, 0, 0][ring], weights[0, 0, 0][~ring]
    torch.testing.assert_close(near / far.mean(), torch.full_like(near, 4.0))
    torch.testing.assert_close(weights.mean((1, 2, 3, 4)), torch.ones(2))
    torch.testing.assert_close(weights[1], torch.ones_like(weights[1]))
    torch.testing.assert_close(foreground_weights(videos, 1.0), torch.ones_like(weights))


def test_foreground_weights_on_two_objects_and_a_light_background():
    from t2v.data import ClipSpec, ObjectSpec, render
    from t2v.training.foreground_weights import foreground_weights

    spec = ClipSpec((ObjectSpec("yellow", "square", "left", "slow"), ObjectSpec("blue", "circle", "still")), "white")
    videos = render([spec], generator=torch.Generator().manual_seed(0))  # yellow differs from white in blue only
    weights = foreground_weights(videos, 3.0)[0, 0]
    on_objects = (videos[0] < 0.9).any(0)  # anything not white
    heavy = weights > weights.min() * 2
    assert heavy[on_objects].all() and heavy.float().mean() < 0.5
    with pytest.raises(ValueError, match="foreground_weight must be positive"):
        train(TrainConfig(foreground_weight=0.0))


def test_flow_loss_uses_the_pixel_weights():
    from t2v.training.trainer import FlowMatchingModule

    torch.manual_seed(0)
    text_encoder = TextEncoder(vocab=vocabulary(), **TINY_TEXT)
    module = FlowMatchingModule(text_encoder, randomised(VideoDiT(**TINY_DIT)))
    ids, mask = text_encoder.tokenize(["a red circle moves to the left", "a blue square"], warn_unknown=False)
    videos, noise = torch.rand(2, 3, 2, 8, 8) * 2 - 1, torch.randn(2, 3, 2, 8, 8)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain, _ = module(ids, mask, videos, t, noise)
        ones, _ = module(ids, mask, videos, t, noise, pixel_weights=torch.ones(2, 1, 2, 8, 8))
        weights = torch.zeros(2, 1, 2, 8, 8)
        weights[:, :, :, :4] = 2.0  # only the top half counts
        top, _ = module(ids, mask, videos, t, noise, pixel_weights=weights)
        tt = t.view(-1, 1, 1, 1, 1)
        text = text_encoder(ids, mask)
        velocity = module.transformer((1 - tt) * videos + tt * noise, t * 1000, text, mask).sample
    torch.testing.assert_close(ones, plain)
    expected = (velocity - (noise - videos))[..., :4, :].square().mean()
    torch.testing.assert_close(top, expected)
    assert not torch.isclose(top, plain)


def test_training_with_the_caption_attribute_loss_logs_it_and_lowers_it(tmp_path):
    # Foreground weighting on as well, so that the weighted flow loss runs through training too.
    cfg = TrainConfig(output_dir=str(tmp_path), steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                      frames=4, height=16, width=16, transformer=dict(TINY_DIT, caption_layout=True),
                      text_encoder=TINY_TEXT, log_every=1, save_every=1000, caption_attribute_loss=1.0,
                      foreground_weight=4.0)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    attribute = [r["attribute_loss"] for r in records]
    assert len(attribute) == 40 and sum(attribute[-5:]) < 0.85 * sum(attribute[:5])


def test_distillation_target_splits_the_loss_between_data_and_teacher():
    from t2v.training.distillation import blended_target

    videos, noise, teacher, velocity = (torch.randn(2, 3, 2, 4, 4) for _ in range(4))
    data = noise - videos
    for weight in (0.0, 0.3, 1.0):
        blended = (velocity - blended_target(videos, noise, teacher, weight)).square()
        parts = (1 - weight) * (velocity - data).square() + weight * (velocity - teacher).square()
        constant = weight * (1 - weight) * (teacher - data).square()  # independent of the prediction
        torch.testing.assert_close(blended, parts - constant)
    torch.testing.assert_close(blended_target(videos, noise, None, 0.5), data)


def test_guidance_pairs_fit_the_guided_velocity_as_well_as_each_pass():
    from t2v.training.distillation import guidance_pairs
    from t2v.training.flow_path import path_velocity
    from t2v.training.foreground_weights import foreground_weights
    from t2v.training.trainer import FlowMatchingModule

    torch.manual_seed(0)
    encoder, transformer = TextEncoder(vocab=vocabulary(), **TINY_TEXT), randomised(VideoDiT(**TINY_DIT))
    module = FlowMatchingModule(encoder, transformer)
    videos, noise = torch.rand(5, 3, 4, 16, 16) * 2 - 1, torch.randn(5, 3, 4, 16, 16)
    videos, t, noise = guidance_pairs(2, videos, torch.rand(5), noise)  # 2 clips of 5, each twice
    assert len(videos) == 4 and torch.equal(videos[:2], videos[2:]) and torch.equal(noise[:2], noise[2:])
    ids, mask = encoder.tokenize(["a red circle moves to the left", "a blue square grows", "", ""])
    teacher, weights = torch.randn_like(videos), foreground_weights(videos, 4.0)
    scale = 2.5
    with torch.no_grad():
        loss, _ = module(ids, mask, videos, t, noise, pixel_weights=weights, teacher_velocity=teacher,
                         teacher_weight=1.0, guidance_scale=scale)
        velocity = path_velocity(transformer, encoder(ids, mask), mask, videos, t, noise)

    def guided(v):  # what the pipeline samples with: u + s * (c - u)
        return v[2:] + scale * (v[:2] - v[2:])

    each_pass = ((velocity - teacher) ** 2 * weights).mean()
    guided_fit = ((guided(velocity) - guided(teacher)) ** 2 * weights[:2]).mean() / scale ** 2
    torch.testing.assert_close(loss, (each_pass + guided_fit) / 2)
    assert guided_fit > 0.1 * each_pass  # the guided term is not lost in the sum


def test_distillation_brings_the_sparse_model_toward_the_dense_teacher(tmp_path):
    import attention

    init = tmp_path / "init"
    torch.manual_seed(0)
    randomised(VideoDiT(**TINY_DIT)).save_pretrained(init / "transformer")
    TextEncoder(vocab=vocabulary(), **TINY_TEXT).save_pretrained(init / "text_encoder")
    sparse = dict(block_size=16, sparsity=0.75)

    def fine_tune(name, teacher_weight, steps=150, teacher_from=None, distill_guidance_scale=0.0, **options):
        cfg = TrainConfig(output_dir=str(tmp_path / name), steps=steps, batch_size=8, learning_rate=1e-4,
                          warmup_steps=1, ema_decay=0.0, log_every=1, save_every=1000, frames=4, height=16,
                          width=16, init_from=str(init), teacher_weight=teacher_weight, teacher_from=teacher_from,
                          distill_guidance_scale=distill_guidance_scale, attention="vmoba",
                          attention_options=options or sparse)
        return train(cfg), [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]

    # Fixed inputs on which each student is compared with the dense teacher (the initial weights, own attention).
    encoder = TextEncoder.from_pretrained(init / "text_encoder")
    ids, mask = encoder.tokenize(["a red circle moves to the left", ""], warn_unknown=False)
    generator = torch.Generator().manual_seed(1)
    noisy, t = torch.randn(2, 3, 4, 16, 16, generator=generator), torch.tensor([300.0, 800.0])

    def velocity(weights, method=None):
        transformer = VideoDiT.from_pretrained(weights / "transformer")
        if method:
            attention.apply(transformer, method, **sparse)
        with torch.no_grad():
            text = TextEncoder.from_pretrained(weights / "text_encoder")(ids, mask)
            return transformer(noisy, t, text, mask).sample

    teacher = velocity(init)
    gap = {name: (velocity(weights, "vmoba") - teacher).square().mean().item()
           for name, weights in (("training-free", init), ("data", fine_tune("data", 0.0)[0]),
                                 ("teacher", fine_tune("teacher", 1.0)[0]))}
    assert gap["training-free"] > 1e-4  # skipping blocks moves the model off the teacher...
    assert gap["teacher"] < 0.85 * gap["training-free"]  # ...distilling brings it back...
    assert gap["teacher"] < 0.2 * gap["data"]  # ...where training on the (random model's unseen) data moves it away
    # VMoBA keeping every block is the teacher's own dense attention: nothing to learn at the first step.
    assert fine_tune("all-blocks", 1.0, steps=1, block_size=16, threshold=1.0)[1][0] < 1e-8
    # With guidance pairs the second half of the batch repeats the first on the same noisy clips, uncaptioned.
    from t2v.training.trainer import FlowMatchingModule

    seen, forward = {}, FlowMatchingModule.forward

    def recording(self, input_ids, text_mask, videos, t, noise, attribute_targets=None, stated=None, *rest):
        seen.update(ids=input_ids, mask=text_mask, videos=videos, t=t, noise=noise, stated=stated)
        return forward(self, input_ids, text_mask, videos, t, noise, attribute_targets, stated, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlowMatchingModule, "forward", recording)
        fine_tune("pairs", 1.0, steps=1, distill_guidance_scale=2.5)
    for name in ("videos", "t", "noise"):
        assert torch.equal(*seen[name].chunk(2)), name
    empty_ids, empty_mask = encoder.tokenize([""] * 4)
    assert torch.equal(seen["ids"][4:], empty_ids) and torch.equal(seen["mask"][4:], empty_mask)
    assert seen["mask"][:4].sum(1).gt(empty_mask.sum(1)).all()  # the first half keeps its captions
    assert seen["stated"].tolist() == [1.0] * 4 + [0.0] * 4
    # A teacher named apart is loaded from its own folder: here the data-trained weights, not the initial ones.
    other = fine_tune("other-teacher", 1.0, steps=1, teacher_from=str(tmp_path / "data" / "ema"), block_size=16,
                      threshold=1.0)[1][0]
    assert other > 1e-3
    with pytest.raises(ValueError, match="init_from"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), teacher_weight=1.0, attention="vmoba"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), teacher_weight=1.5))
    with pytest.raises(ValueError, match="teacher_weight above 0"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), teacher_from=str(init), attention="vmoba"))
    for scale, weight, batch in ((2.5, 0.0, 8), (1.0, 1.0, 8), (2.5, 1.0, 1)):
        with pytest.raises(ValueError, match="distill_guidance_scale must be above 1"):
            train(TrainConfig(output_dir=str(tmp_path / "bad"), init_from=str(init), attention="vmoba",
                              teacher_weight=weight, distill_guidance_scale=scale, batch_size=batch))
    # Sparse-fine-tuned weights run densely are no teacher: going on from them needs the dense model named.
    from t2v.training.trainer import fine_tuned_with_sparse_attention

    assert not fine_tuned_with_sparse_attention(init)
    assert fine_tuned_with_sparse_attention(tmp_path / "teacher" / "ema")  # its run's train_config.json names vmoba
    (init / "attention_config.json").write_text(json.dumps({"method": "vmoba", "options": sparse}))
    with pytest.raises(ValueError, match="name the dense model"):
        train(TrainConfig(output_dir=str(tmp_path / "bad"), init_from=str(init), teacher_weight=1.0,
                          attention="vmoba"))
