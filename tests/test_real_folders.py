"""Local diffusers folders of real models: `load_pipeline`, `t2v generate --model FOLDER` and scripts/generate.py on a
tiny random Wan pipeline saved to disk.

diffusers' WanPipeline needs transformers (its T5 text encoder and tokenizer). Where transformers is installed the
tests run on the real WanPipeline with a tiny T5; where it is not, they run on a stand-in of the same name (the
transformer and VAE of Wan, no text encoder) so that the loading and the commands are still covered.
"""

import importlib.util
import json
import types
from pathlib import Path

import diffusers
import imageio.v3 as iio
import pytest
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor

import attention
from pipelines import load_pipeline
from t2v.cli import main as t2v_main

# On the CPU a sparse method runs its PyTorch reference, which says so.
pytestmark = pytest.mark.filterwarnings("ignore:block-sparse attention. no Triton kernel")

TEXT_DIM = 16
SIZE = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2"]  # 2 x 4 x 4 latent tokens
WORDS = ["a", "red", "circle", "moves", "right", "cat", "walks"]


def _video_components() -> dict:
    torch.manual_seed(0)
    return dict(
        transformer=WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=16,
                                          ffn_dim=32, num_layers=2, rope_max_seq_len=32),
        vae=AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True]),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _save_real_wan(folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: index for index, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, **_video_components()).save_pretrained(folder)


class WanPipeline(DiffusionPipeline):
    """Stands in for diffusers' WanPipeline without transformers: its name, video components and call arguments."""

    def __init__(self, transformer, vae, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, height=480, width=832, num_frames=81, num_inference_steps=50,
                 guidance_scale=5.0, generator=None):
        text = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(len(prompt)))
        latents = randn_tensor((1, 16, (num_frames - 1) // 4 + 1, height // 8, width // 8), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            velocity = self.transformer(latents, t.expand(1), text).sample
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        video = self.vae.decode(latents).sample.clamp(-1, 1)  # (1, 3, frames, height, width)
        return types.SimpleNamespace(frames=((video + 1) / 2).permute(0, 2, 3, 4, 1).numpy())


@pytest.fixture(params=["diffusers", "stand-in"])
def wan_folder(request, tmp_path, monkeypatch):
    folder = tmp_path / "tiny-wan"
    if request.param == "diffusers":
        if importlib.util.find_spec("transformers") is None:
            pytest.skip("diffusers' WanPipeline needs transformers, which is not installed (the stand-in runs)")
        _save_real_wan(folder)
    else:
        monkeypatch.setattr(diffusers, "WanPipeline", WanPipeline)  # what the loader finds by the folder's name
        WanPipeline(**_video_components()).save_pretrained(folder)
    return folder


def _frames(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe("a red circle moves right", num_frames=5, height=32, width=32, num_inference_steps=2,
                generator=generator).frames[0]


def test_load_pipeline_returns_the_diffusers_pipeline_with_the_method_installed(wan_folder):
    plain = load_pipeline(wan_folder, device="cpu")
    assert type(plain) is diffusers.WanPipeline
    assert attention.current_method(plain.transformer) is None
    pipe = load_pipeline(wan_folder, attention="oracle", device="cpu", threshold=1.0, block_size=4)
    assert attention.current_method(pipe.transformer) == "oracle"
    assert pipe.transformer.dtype == torch.float32 and pipe.device.type == "cpu"
    frames = _frames(pipe)
    assert frames.shape == (5, 32, 32, 3)
    # Keeping every block is dense attention: the same video as the model's own attention.
    assert abs(frames - _frames(plain)).max() < 1e-4


def test_guidance_is_refused_for_a_diffusers_pipeline(wan_folder):
    with pytest.raises(ValueError, match="guidance methods apply only to this project's pipelines.*WanPipeline"):
        load_pipeline(wan_folder, guidance=["fourier-motion"], device="cpu")


def test_t2v_generate_with_a_diffusers_folder_writes_an_mp4(wan_folder, tmp_path, capsys):
    out = tmp_path / "wan.mp4"
    code = t2v_main(["generate", "a cat walks", "--model", str(wan_folder), "-o", str(out), *SIZE, "--seed", "1",
                     "--attention", "dense"])
    assert code == 0, capsys.readouterr().err
    assert iio.imread(out).shape == (5, 256, 256, 3)  # 32 pixels a side, enlarged 8 times


def test_generate_script_with_a_diffusers_folder(wan_folder, tmp_path):
    spec = importlib.util.spec_from_file_location("generate_script",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moves right\n")
    out = tmp_path / "batch"
    assert script.main([str(prompts), "-o", str(out), "--model", str(wan_folder), *SIZE, "--device", "cpu"]) == 0
    record = json.loads((out / "manifest.jsonl").read_text())
    assert record["status"] == "ok" and iio.imread(out / record["file"]).shape[0] == 5


def test_folders_of_other_or_incomplete_pipelines_are_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LTXPipeline"}))
    with pytest.raises(ValueError, match="LTXPipeline.*WanPipeline, HunyuanVideoPipeline, CogVideoXPipeline"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideoPipeline", "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
         "vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}))
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="HunyuanVideoPipeline without transformer;"):
        load_pipeline(tmp_path)
