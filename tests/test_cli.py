"""The `t2v` command: list, generate, and one-line errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from t2v.cli import main

PROMPT = "a red circle moves to the right on black"


def t2v_command() -> list[str]:
    script = Path(sys.executable).parent / "t2v"  # the console script pip installs beside the interpreter
    return [str(script)] if script.exists() else [sys.executable, "-m", "t2v.cli"]


def test_list_shows_models_and_methods():
    result = subprocess.run([*t2v_command(), "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "t2v-tiny" in result.stdout
    assert "t2v-tiny-block (block diffusion" in result.stdout
    assert "t2v-tiny-mate (MATE token mixer: linear cost, up to 128 frames)" in result.stdout
    # A sparse variant states its tail beside its mean (read from the quality.json it ships with).
    vmoba = result.stdout.split("t2v-tiny-vmoba (")[1].split("\n  t2v-tiny")[0]
    assert "measured: " in vmoba and "dB from the dense model's clip" in vmoba and "under 20 dB" in vmoba
    assert "; t2v-tiny runs the noisiest steps, timestep >= 93% of the schedule's" in vmoba
    assert "attention methods:\n  dense" in result.stdout
    assert "guidance methods" in result.stdout


@pytest.mark.parametrize("suffix", ["mp4", "gif"])
def test_generate_writes_a_video(tmp_path, capsys, suffix):
    out = tmp_path / "videos" / f"clip.{suffix}"
    code = main(["generate", PROMPT, "-o", str(out), "--steps", "2", "--frames", "5", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and " s)" in printed
    frames = iio.imread(out)
    assert frames.shape[1:3] == (256, 256)  # 32x32 frames, enlarged 8 times
    if suffix == "mp4":
        assert len(frames) == 5
    else:
        # GIF writers merge identical consecutive frames into one longer frame: the playing time is what stays.
        from PIL import Image, ImageSequence

        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(Image.open(out))]
        assert len(durations) == len(frames) <= 5 and abs(sum(durations) - 5 * 1000 / 8) <= 5 * 10


def test_generate_with_attention_method(tmp_path):
    out = tmp_path / "dense.mp4"
    code = main(["generate", PROMPT, "-o", str(out), "--steps", "1", "--frames", "2", "--attention", "dense",
                 "--attention-option", "dense_warmup_steps=1"])
    assert code == 0 and iio.imread(out).shape[0] == 2


def test_empty_prompt_exits_2_without_traceback(tmp_path):
    result = subprocess.run([*t2v_command(), "generate", "  ", "-o", str(tmp_path / "x.mp4")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "t2v: error: the prompt is empty"
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("extra, message", [
    (["--attention", "no-such-method"], "registered methods: dense"),
    (["--guidance", "no-such-guidance"], "unknown guidance method 'no-such-guidance'"),
    (["--frames", "99"], "it takes frames a multiple of 1 up to 32"),
    (["--frames", "0"], "--frames must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--attention", "dense", "--attention-option", "novalue"], "key=value"),
    (["--model", "no/such/model"], "unknown model 'no/such/model'"),
    (["-o", "clip.avi"], ".mp4 or .gif"),
])
def test_bad_input_exits_2(tmp_path, capsys, extra, message):
    args = ["generate", PROMPT, "--steps", "1", "-o", str(tmp_path / "x.mp4"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("t2v: error:") and err.count("\n") == 1


def test_unwritable_output_fails_before_generation(tmp_path, capsys, monkeypatch):
    import pipelines

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(pipelines, "load_pipeline", must_not_load)
    (tmp_path / "a-file").write_text("")
    assert main(["generate", PROMPT, "-o", str(tmp_path / "a-file" / "x.mp4")]) == 2
    assert "cannot write to folder" in capsys.readouterr().err


def test_option_values_read_as_literals_and_lowercase_booleans():
    from t2v.cli import parse_option

    assert parse_option("rectify=false") == ("rectify", False)  # not the string 'false', which is truthy
    assert parse_option("rectify=True") == ("rectify", True)
    assert parse_option("dense_layers=[0, 1]") == ("dense_layers", [0, 1])
    assert parse_option("threshold=0.25") == ("threshold", 0.25)
    assert parse_option("mode=none") == ("mode", None)
    assert parse_option("name=temporal") == ("name", "temporal")


def test_position_interpolation_is_on_past_the_trained_frames_and_can_be_left_out(tmp_path):
    videos = {}
    for name, flags in [("auto", []), ("off", ["--no-position-interpolation"]),
                        ("named", ["--guidance", "position-interpolation"])]:
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", PROMPT, "-o", str(out), "--steps", "1", "--frames", "18", *flags]) == 0
        videos[name] = iio.imread(out).astype(int)
    assert np.array_equal(videos["auto"], videos["named"]) and np.abs(videos["auto"] - videos["off"]).max() > 0
    assert main(["generate", PROMPT, "-o", str(tmp_path / "b.mp4"), "--model", "t2v-tiny-block", "--steps", "1",
                 "--frames", "4", "--no-position-interpolation"]) == 2
