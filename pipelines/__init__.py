from pipelines.block_diffusion import BlockDiffusionPipeline
from pipelines.loading import available_models, check_output_path, export_video, load_pipeline
from pipelines.text_to_video import TextToVideoPipeline, TextToVideoPipelineOutput

__all__ = ["BlockDiffusionPipeline", "TextToVideoPipeline", "TextToVideoPipelineOutput", "available_models", "check_output_path", "export_video",
           "load_pipeline"]
