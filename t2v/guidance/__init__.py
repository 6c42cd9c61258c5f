"""Training-free guidance methods and their registry.

Classifier-free guidance is always on: it is diffusers' ``ClassifierFreeGuidance``, the pipeline's ``guider``,
and its strength is the call's ``guidance_scale`` (or the "cfg" entry's ``scale``). The methods registered here
come on top of it: each is a ``Guidance`` subclass (see ``base``), passed to a pipeline as ``guidance=[...]`` by
name or as an object. Built in: "cfg", "temporal-self-guidance" and "fourier-motion" (BroadWay, on DiTs; see
``temporal_maps``), and "position-interpolation" (clips longer than trained).

    from t2v.guidance import available_guidance, get_guidance
    pipe(prompt, guidance=[get_guidance("temporal-self-guidance", strength=0.5), "fourier-motion"])
"""

from __future__ import annotations

from t2v.guidance.base import Guidance

_REGISTRY: dict[str, type[Guidance]] = {}


def register_guidance(name: str, cls: type[Guidance], *, overwrite: bool = False) -> None:
    """Registers a Guidance subclass under `name`."""
    if not isinstance(name, str) or not name:
        raise ValueError("a guidance name must be a non-empty string")
    if not (isinstance(cls, type) and issubclass(cls, Guidance)):
        raise TypeError(f"guidance {name!r} must be a subclass of t2v.guidance.Guidance, got {cls!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"guidance {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = cls


def unregister_guidance(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_guidance() -> list[str]:
    return sorted(_REGISTRY)


def get_guidance(name: str, **options) -> Guidance:
    """A new instance of the guidance registered as `name`; ValueError listing the registered names if none is."""
    if name not in _REGISTRY:
        registered = ", ".join(available_guidance()) or "none yet"
        raise ValueError(f"unknown guidance method {name!r}; registered guidance methods: {registered}")
    return _REGISTRY[name](**options)


def resolve_guidance(items) -> list[Guidance]:
    """Guidance objects from a list of registered names and/or Guidance objects (None -> [])."""
    if items is None:
        return []
    if isinstance(items, (str, Guidance)):
        items = [items]
    resolved = []
    for item in items:
        if isinstance(item, str):
            resolved.append(get_guidance(item))
        elif hasattr(item, "adjust_prediction"):  # a Guidance or any object with the same calls
            resolved.append(item)
        else:
            raise TypeError(f"guidance must be a registered name or a Guidance object, got {item!r}")
    return resolved


def _register_builtins() -> None:
    from t2v.guidance.cfg import ClassifierFreeGuidanceScale
    from t2v.guidance.fourier_motion import FourierMotionEnhancement
    from t2v.guidance.position_interpolation import PositionInterpolation
    from t2v.guidance.temporal_self_guidance import TemporalSelfGuidance

    for cls in (ClassifierFreeGuidanceScale, TemporalSelfGuidance, FourierMotionEnhancement, PositionInterpolation):
        register_guidance(cls.name, cls)


_register_builtins()

__all__ = ["Guidance", "available_guidance", "get_guidance", "register_guidance", "resolve_guidance",
           "unregister_guidance"]
