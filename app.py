"""Gradio demo: type a prompt, get a video from the embedded model.

    python app.py                 # http://127.0.0.1:7860
    python app.py --port 8000     # or GRADIO_SERVER_PORT=8000
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the demo talks to nobody but its page

import gradio as gr
import torch

import attention
from pipelines import available_models, export_video, load_pipeline
from t2v.cli import parse_option
from t2v.guidance import get_guidance

MODEL_ATTENTION = "model's own"  # the dropdown entry that installs no attention method
OUTPUT_DIR = Path(tempfile.gettempdir()) / "t2v-demo"
# Guidance methods with a strength slider: (label, slider maximum, default). CFG is the guidance-scale slider.
GUIDANCE_SLIDERS = {
    "temporal-self-guidance": ("Temporal self-guidance strength", 1.0, 0.6),
    "fourier-motion": ("Fourier motion enhancement strength", 4.0, 0.5),
}


def parse_attention_options(text: str) -> tuple:
    """'threshold=0.25, block_size=64' -> (("block_size", 64), ("threshold", 0.25)), hashable for the cache."""
    items = [part.strip() for part in (text or "").split(",") if part.strip()]
    return tuple(sorted(parse_option(item, "an attention option") for item in items))


@functools.lru_cache(maxsize=4)
def get_pipeline(model: str, method: str | None, options: tuple = ()):
    """One pipeline per model and attention setting, loaded on first use and kept."""
    pipe = load_pipeline(model, attention=method, **dict(options))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(prompt, seed, steps, frames, model, method, method_options, guidance, guidance_scale, *strengths,
             progress=gr.Progress()):
    if not prompt or not prompt.strip():
        raise gr.Error("Please type a prompt.")
    steps, frames = int(steps), int(frames)
    try:
        options = parse_attention_options(method_options)
        pipe = get_pipeline(model, None if method == MODEL_ATTENTION else method, options)
        strength_of = dict(zip(GUIDANCE_SLIDERS, strengths))
        chosen = [get_guidance(name, strength=float(strength_of[name])) for name in guidance or []]

        def on_step(pipeline, step, timestep, callback_kwargs):
            progress((step + 1, steps), desc="denoising")
            return callback_kwargs

        start = time.perf_counter()
        video = pipe(
            prompt, num_frames=frames, num_inference_steps=steps, guidance_scale=float(guidance_scale),
            guidance=chosen, generator=torch.Generator(device="cpu").manual_seed(int(seed)),
            callback_on_step_end=on_step,
        ).frames[0]
        seconds = time.perf_counter() - start
        path = export_video(video, OUTPUT_DIR / f"video-{time.time_ns()}.mp4")
    except Exception as error:  # shown in the page; the server goes on serving
        raise gr.Error(" ".join(str(error).split()) or type(error).__name__) from error
    _, height, width = video.shape[:3]
    return str(path), f"Generated in {seconds:.1f} s ({steps} steps, {frames} frames of {width}x{height}, seed {seed})"


def model_guidance_scale(model: str) -> float:
    """The classifier-free guidance scale the model's own guider uses: the slider's value when the model is picked
    (a variant may have been tuned at another scale than the embedded model)."""
    return get_pipeline(model, None, ()).guider.guidance_scale


def build_demo() -> gr.Blocks:
    models = list(available_models())  # the embedded model first, then its fine-tuned variants
    pipe = get_pipeline(models[0], None, ())
    default_frames = pipe.default_video_shape[0]
    max_frames = pipe.transformer.config.max_frames
    frame_step = pipe.transformer.config.patch_size[0]  # frame counts the model takes
    default_scale = model_guidance_scale(models[0])
    with gr.Blocks(title="t2v", analytics_enabled=False) as demo:
        gr.Markdown("# t2v: text to video\nThe embedded model draws simple shapes of named colours moving in "
                    "named ways, e.g. *a red circle moves to the right on black*.")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="", placeholder="a red circle moves to the right on black",
                                    elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                    frames = gr.Slider(frame_step, max_frames, value=default_frames, step=frame_step, label="Frames",
                                       elem_id="frames")
                model = gr.Dropdown(models, value=models[0], label="Model", elem_id="model",
                                    info="variants were fine-tuned with the attention method they are named after, "
                                         "and use it under \"model's own\"")
                method = gr.Dropdown([MODEL_ATTENTION, *attention.available_methods()], value=MODEL_ATTENTION,
                                     label="Attention method", elem_id="attention")
                method_options = gr.Textbox(label="Attention options", placeholder="threshold=0.25, block_size=64",
                                            elem_id="attention-options")
                guidance = gr.CheckboxGroup(list(GUIDANCE_SLIDERS), label="Guidance", elem_id="guidance")
                strengths = [gr.Slider(0, top, value=default, step=0.05, label=label, elem_id=f"{name}-strength")
                             for name, (label, top, default) in GUIDANCE_SLIDERS.items()]
                scale = gr.Slider(1, 15, value=default_scale, step=0.5, label="Guidance scale (classifier-free)",
                                  elem_id="guidance-scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True)
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
        model.change(model_guidance_scale, model, scale)
        button.click(generate, [prompt, seed, steps, frames, model, method, method_options, guidance, scale, *strengths],
                     [video, status])
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    build_demo().queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[str(OUTPUT_DIR)])


if __name__ == "__main__":
    main()
