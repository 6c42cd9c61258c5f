"""The README's first command writes a video whose content the scorer says matches its prompt."""

import re
import shlex
from pathlib import Path

import imageio.v3 as iio

from t2v.cli import main
from t2v.eval import score_clip

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_command_one_video_matches_its_prompt(tmp_path, monkeypatch):
    line = next(line for line in README.read_text().splitlines() if "t2v generate" in line and "pip install" in line)
    words = shlex.split(re.sub(r"^.*?t2v generate", "generate", line))
    prompt, output = words[1], words[words.index("-o") + 1]
    monkeypatch.chdir(tmp_path)
    assert main(words) == 0
    video = iio.imread(tmp_path / output)  # enlarged for viewing by an integer factor
    factor = video.shape[1] // 32
    frames = video.reshape(video.shape[0], 32, factor, 32, factor, 3).mean((2, 4)) / 255.0
    result = score_clip(frames, prompt)
    assert result["all"], {k: v for k, v in result.items() if k != "reading"}
