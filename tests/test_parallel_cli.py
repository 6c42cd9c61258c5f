"""Context parallelism from the entry points: `t2v generate --parallel ulysses` and `scripts/generate.py --parallel
ulysses` (with a step cache) under `torchrun --nproc-per-node 2` (two CPU processes over gloo) write the videos one
process writes, and say how to launch them when they are not launched so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeGuidance

from pipelines import TextToVideoPipeline, load_pipeline
from t2v.cli import main as t2v_main
from t2v.data import vocabulary
from t2v.models import TextEncoder, VideoDiT
from tiny_models import TINY_DIT, TINY_TEXT, randomised

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moves to the right on black", "a blue square moves up on white"]
FAST = ["--steps", "3", "--device", "cpu"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny pipeline whose VideoDiT has 2 heads and 64 tokens a video: both split evenly over 2 processes."""
    path = tmp_path_factory.mktemp("tiny-pipeline")
    TextToVideoPipeline(text_encoder=randomised(TextEncoder(vocab=vocabulary(), **TINY_TEXT)),
                        transformer=randomised(VideoDiT(**TINY_DIT)),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                        guider=ClassifierFreeGuidance(guidance_scale=5.0)).save_pretrained(path)
    # MagCache's calibration beside the weights, as `python -m pipelines.caches FOLDER` writes it.
    (path / "transformer" / "mag_ratios.json").write_text(json.dumps({"mag_ratios": [1.0, 0.99, 0.98, 0.97]}))
    return path


def torchrun(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def frames(path: Path) -> np.ndarray:
    return iio.imread(path)


def test_t2v_generate_split_across_two_processes_writes_the_one_process_video(folder, tmp_path, capsys):
    common = ["generate", PROMPTS[0], "--model", str(folder), *FAST]
    assert t2v_main([*common, "-o", str(tmp_path / "one.gif")]) == 0
    result = torchrun("-m", "t2v.cli", *common, "--parallel", "ulysses", "-o", str(tmp_path / "two.gif"))
    assert result.stdout.count("two.gif") == 1  # the first process alone writes and reports
    np.testing.assert_array_equal(frames(tmp_path / "two.gif"), frames(tmp_path / "one.gif"))


def test_batch_script_splits_each_video_across_two_processes_with_a_step_cache(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    # The cache's hooks go on before the token split, and keep their place when MagCache follows the call's steps.
    common = [str(prompts), "--model", str(folder), *FAST, "--format", "gif", "--cache", "mag",
              "--cache-option", "threshold=1.0"]
    one = subprocess.run([sys.executable, "scripts/generate.py", *common, "-o", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun("scripts/generate.py", *common, "-o", str(tmp_path / "two"), "--parallel", "ulysses")
    records = [json.loads(line) for line in (tmp_path / "two" / "manifest.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records] == ["ok", "ok"]  # one record per video, not one per process
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir())
    for record in records:
        np.testing.assert_array_equal(frames(tmp_path / "two" / record["file"]),
                                      frames(tmp_path / "one" / record["file"]))


def test_without_a_launcher_the_commands_say_how_to_launch(folder, tmp_path, capsys, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert t2v_main(["generate", PROMPTS[0], "--model", str(folder), "--parallel", "ulysses",
                     "-o", str(tmp_path / "x.gif")]) == 2
    assert "launch them with `torchrun --nproc-per-node N" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="launch them with `torchrun --nproc-per-node N"):
        load_pipeline(folder, device="cpu", parallel="ulysses")
    with pytest.raises(ValueError, match="parallel must be one of ulysses, ring"):
        load_pipeline(folder, device="cpu", parallel="tensor")
    with pytest.raises(ValueError, match="'first-block' cannot run under context parallelism"):
        load_pipeline(folder, device="cpu", parallel="ulysses", cache="first-block")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    script = subprocess.run([sys.executable, "scripts/generate.py", str(prompts), "-o", str(tmp_path / "out"),
                             "--model", str(folder), "--parallel", "ulysses"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert script.returncode == 2 and "launch them with `torchrun --nproc-per-node N`" in script.stderr


def test_a_failed_item_of_a_split_batch_keeps_the_others_and_the_exit_code(folder, tmp_path):
    # Every rank ends through leave_process_group: the batch's exit code must survive its immediate exit.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + json.dumps({"prompt": PROMPTS[1], "frames": 99})
                       + "\n")
    torchrun("scripts/generate.py", str(prompts), "--model", str(folder), *FAST, "--format", "gif",
             "-o", str(tmp_path / "out"), "--parallel", "ulysses", expect=1)
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [record["status"] for record in records] == ["ok", "error"]
