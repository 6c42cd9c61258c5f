"""scripts/generate.py: a batch with a bad item, resuming, bad files, and a split across two processes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
FAST = ["--steps", "2", "--frames", "4"]


def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_script()


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_batch_with_a_bad_line_then_resume(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red circle moves to the right on black", "seed": 7}',
        '{"prompt": "a blue square moves up on white", "name": "blue"}',
        "# a comment, then a blank line",
        "",
        '{"prompt": "a green triangle moves left on gray", "guidance_scale": 3.0',
        '{"prompt": "a yellow circle grows on black", "attention": "dense"}',
        '{"prompt": "a purple square shrinks on white", "negative_prompt": "red"}',
        '{"prompt": "an orange triangle moves down on gray", "frames": 3}',
    ]) + "\n")
    out = tmp_path / "out"
    assert generate.main([str(prompts), "-o", str(out), *FAST]) == 1  # 1: an item failed
    records = manifest(out)
    assert len(records) == 6
    assert [r["status"] for r in records] == ["ok", "ok", "error", "ok", "ok", "ok"]
    bad = records[2]
    assert bad["error"].startswith(f"{prompts}:5:") and bad["prompt"] is None
    videos = sorted(p.name for p in out.glob("*.mp4"))
    assert len(videos) == 5 and "blue.mp4" in videos
    assert records[0]["seed"] == 7 and records[1]["seed"] == 1  # given, or --seed plus the item's index
    assert all(r["seconds"] > 0 for r in records if r["status"] == "ok")
    assert records[5]["options"] == {"frames": 3}

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    capsys.readouterr()
    assert generate.main([str(prompts), "-o", str(out), *FAST]) == 1
    assert "6 items, 5 already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == before  # nothing generated again
    again = manifest(out)
    assert [r for r in again if r["status"] == "ok"] == [r for r in records if r["status"] == "ok"]
    assert again[2]["error"] == bad["error"]
    assert not list(out.glob("manifest.jsonl.part-*"))


def test_txt_prompts_and_per_item_failure(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comments and blank lines are skipped\n\na red circle moves up on black\n\n"
                       "a blue square moves down on white\n")
    out = tmp_path / "out"
    assert generate.main([str(prompts), "-o", str(out), "--steps", "1", "--frames", "2", "--format", "gif"]) == 0
    assert [r["prompt"] for r in manifest(out)] == ["a red circle moves up on black",
                                                    "a blue square moves down on white"]
    assert len(list(out.glob("*.gif"))) == 2

    # An item the model cannot take fails on its own, with the model's reason.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle", "frames": 99}\n{"prompt": "a red circle", "attention": "nope"}\n'
                   '{"prompt": "a red circle", "colour": "red"}\n{"prompt": ""}\n')
    assert generate.main([str(bad), "-o", str(tmp_path / "bad-out"), "--steps", "1"]) == 1
    errors = [r["error"] for r in manifest(tmp_path / "bad-out")]
    assert "up to 32" in errors[0] and "registered methods: dense" in errors[1]
    assert f"{bad}:3: unknown option 'colour'" in errors[2] and f"{bad}:4: the prompt is empty" in errors[3]


def test_bad_files_are_clear_errors(tmp_path, capsys):
    assert generate.main([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "out")]) == 2
    assert "cannot read prompts file" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "a-file").write_text("")
    assert generate.main([str(prompts), "-o", str(tmp_path / "a-file" / "out")]) == 2
    assert "cannot write to folder" in capsys.readouterr().err


@pytest.mark.slow
def test_split_across_two_processes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a red circle moves {d} on black\n" for d in ("up", "down", "left", "right", "up")))
    out = tmp_path / "out"
    # --multi_gpu selects accelerate's torchrun launcher; without CUDA the two processes join on the CPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*launcher, str(SCRIPT), str(prompts), "-o", str(out), "--steps", "1", "--frames", "2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process 1" in result.stderr  # the second process had its own share
    assert [r["status"] for r in manifest(out)] == ["ok"] * 5 and len(list(out.glob("*.mp4"))) == 5
    assert not list(out.glob("manifest.jsonl.part-*"))
