"""Gradio demo: type a prompt, get a video from the embedded model.

    python app.py                 # http://127.0.0.1:7860
    python app.py --port 8000     # or GRADIO_SERVER_PORT=8000
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the demo talks to nobody but its page

import gradio as gr
import numpy as np
import torch

import attention
from pipelines import BlockDiffusionPipeline, available_models, export_video, load_pipeline
from t2v.cli import parse_option
from t2v.guidance import get_guidance

MODEL_ATTENTION = "model's own"  # the dropdown entry that installs no attention method
OUTPUT_DIR = Path(tempfile.gettempdir()) / "t2v-demo"
LONG_FRAMES = 128  # the frames slider's end for a block model, which makes any length chunk by chunk
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


def frame_choices(pipe) -> tuple[int, int]:
    """(step, maximum) of the frame counts a pipeline takes: a block model makes any multiple of its chunk (the
    slider stops at LONG_FRAMES), others their trained range."""
    if isinstance(pipe, BlockDiffusionPipeline):
        return pipe.transformer.config.chunk_frames, LONG_FRAMES
    return pipe.transformer.config.patch_size[0], pipe.transformer.config.max_frames


def generate_stream(prompt, seed, steps, frames, model, method, method_options, guidance, guidance_scale,
                    *strengths, progress=gr.Progress()):
    """Yields (video file, status): for a block model after every finished chunk (the frames so far), and at the
    end the whole clip."""
    if not prompt or not prompt.strip():
        raise gr.Error("Please type a prompt.")
    steps, frames = int(steps), int(frames)
    try:
        options = parse_attention_options(method_options)
        pipe = get_pipeline(model, None if method == MODEL_ATTENTION else method, options)
        strength_of = dict(zip(GUIDANCE_SLIDERS, strengths))
        chosen = [get_guidance(name, strength=float(strength_of[name])) for name in guidance or []]
    except Exception as error:
        raise gr.Error(" ".join(str(error).split()) or type(error).__name__) from error
    chunked = isinstance(pipe, BlockDiffusionPipeline)
    total = steps * (frames // pipe.chunk_frames if chunked else 1)
    done_steps = [0]

    def on_step(pipeline, step, timestep, callback_kwargs):
        # A step of a block model's opening model (its own pipeline) stands for all the chunks it makes.
        done_steps[0] += 1 if pipeline is pipe else pipe.config.opening_frames // pipe.chunk_frames
        progress((done_steps[0], total), desc="denoising")
        return callback_kwargs

    events: queue.Queue = queue.Queue()
    call = dict(num_frames=frames, num_inference_steps=steps, guidance_scale=float(guidance_scale), guidance=chosen,
                generator=torch.Generator(device="cpu").manual_seed(int(seed)), callback_on_step_end=on_step)
    if chunked:
        call["callback_on_chunk_end"] = lambda pipeline, index, chunk: events.put(("chunk", index, chunk[0]))

    def work():
        try:
            events.put(("done", None, pipe(prompt, **call).frames[0]))
        except Exception as error:  # reported by the page; the server goes on serving
            events.put(("error", None, error))

    start = time.perf_counter()
    threading.Thread(target=work, daemon=True).start()
    shown = []
    while True:
        kind, index, payload = events.get()
        if kind == "error":
            raise gr.Error(" ".join(str(payload).split()) or type(payload).__name__) from payload
        if kind == "chunk":
            shown.append(payload)
            if index + 1 < frames // pipe.chunk_frames:  # the last chunk comes with the whole clip
                path = export_video(np.concatenate(shown), OUTPUT_DIR / f"video-{time.time_ns()}.mp4")
                yield str(path), f"{(index + 1) * pipe.chunk_frames} of {frames} frames made ..."
            continue
        video, seconds = payload, time.perf_counter() - start
        path = export_video(video, OUTPUT_DIR / f"video-{time.time_ns()}.mp4")
        _, height, width = video.shape[:3]
        yield (str(path), f"Generated in {seconds:.1f} s ({steps} steps, {frames} frames of {width}x{height}, "
                          f"seed {seed})")
        return


def generate(*args, **kwargs):
    """The finished clip of `generate_stream`: (video file, status)."""
    result = None
    for result in generate_stream(*args, **kwargs):
        pass
    return result


def model_guidance_scale(model: str) -> float:
    """The classifier-free guidance scale the model's own guider uses: the slider's value when the model is picked
    (a variant may have been tuned at another scale than the embedded model)."""
    return get_pipeline(model, None, ()).guider.guidance_scale


def pick_model(model: str, frames: int):
    """On picking a model: its guidance scale, and the frames slider set to the lengths it can make."""
    step, top = frame_choices(get_pipeline(model, None, ()))
    value = min(top, max(step, int(frames) // step * step))
    return model_guidance_scale(model), gr.update(minimum=step, maximum=top, step=step, value=value)


def build_demo() -> gr.Blocks:
    models = list(available_models())  # the embedded model first, then its fine-tuned variants
    pipe = get_pipeline(models[0], None, ())
    default_frames = pipe.default_video_shape[0]
    frame_step, max_frames = frame_choices(pipe)  # frame counts the model takes
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
                                         "and use it under \"model's own\"; t2v-tiny-block makes clips of any "
                                         "length chunk by chunk, shown as they come")
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
        model.change(pick_model, [model, frames], [scale, frames])
        button.click(generate_stream, [prompt, seed, steps, frames, model, method, method_options, guidance, scale, *strengths],
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
