from t2v.models.block_dit import BlockVideoDiT
from t2v.models.mate_dit import MateVideoDiT
from t2v.models.video_dit import VideoDiT

__all__ = ["BlockVideoDiT", "MateVideoDiT", "TextEncoder", "VideoDiT"]


def __getattr__(name):
    # The text encoder needs t2v.data's tokenizer; import it on first use so VideoDiT loads on its own.
    if name == "TextEncoder":
        from t2v.models.text_encoder import TextEncoder

        return TextEncoder
    raise AttributeError(name)
