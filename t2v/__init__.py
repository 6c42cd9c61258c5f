"""t2v: text-to-video diffusion with swappable sparse attention, training-free guidance and an embedded model."""

from pathlib import Path

__version__ = "0.1.0"

EMBEDDED_MODEL = "t2v-tiny"


def default_model_path() -> Path:
    """Folder of the embedded model that ships inside the package."""
    return Path(__file__).parent / "checkpoints" / EMBEDDED_MODEL
