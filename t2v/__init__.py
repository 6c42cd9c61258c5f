"""t2v: text-to-video diffusion with swappable sparse attention, training-free guidance and an embedded model."""

from pathlib import Path

__version__ = "0.1.0"

EMBEDDED_MODEL = "t2v-tiny"
# Variants of the embedded model that ship with it: the same model fine-tuned with a sparse attention method, and
# its block-causal version that makes clips of any length chunk by chunk.
EMBEDDED_VARIANTS = ("t2v-tiny-vmoba", "t2v-tiny-rectified", "t2v-tiny-block", "t2v-tiny-mate")
# A pipeline folder may name the attention its weights were fine-tuned with; loading installs it unless told otherwise.
TRAINED_ATTENTION_FILE = "attention_config.json"
# A shipped folder may carry its measured quality (held-out clips, and for a sparse variant its distance from the
# dense model's clips, mean and tail); `t2v list` prints it.
QUALITY_FILE = "quality.json"


def default_model_path() -> Path:
    """Folder of the embedded model that ships inside the package."""
    return embedded_model_path(EMBEDDED_MODEL)


def embedded_model_path(name: str) -> Path:
    return Path(__file__).parent / "checkpoints" / name
