"""`apply(transformer, "method", **options)` installs an attention method on a model; `remove` restores the model."""

from __future__ import annotations

import functools
import inspect

from attention.adapters import AdapterState, find_family
from attention.methods import ADAPTER_OPTIONS, SparseOptions, get_method

_STATE_ATTR = "_attention_adapter_state"
# Supplied by the adapter to methods whose signature names them; never user options.
_CONTEXT = ("layer_index", "step", "return_lse")


class LayerMethod:
    """One layer's binding of a method: its options fixed, the step added at call time if the method takes it.

    `return_lse=True` asks for (out, log-sum-exp) instead of out, from methods that take it (`takes_lse`): merging
    partial attentions (block diffusion's in-chunk and block-external parts) needs it."""

    def __init__(self, fn, kwargs: dict, takes_step: bool, reset=None, takes_lse: bool = False):
        self.fn, self.kwargs, self.takes_step, self._reset = fn, kwargs, takes_step, reset
        self.takes_lse = takes_lse

    def __call__(self, q, k, v, layout, step: int, return_lse: bool = False):
        extra = dict(self.kwargs)
        if return_lse:
            if not self.takes_lse:
                raise ValueError("this attention method does not return its log-sum-exp (no `return_lse` option)")
            extra["return_lse"] = True
        if self.takes_step:
            return self.fn(q, k, v, layout, step=step, **extra)
        return self.fn(q, k, v, layout, **extra)

    def reset(self) -> None:
        if self._reset is not None:
            self._reset()

    def prepare(self, layout, device) -> None:
        prepare = getattr(self.fn, "prepare", None)
        if callable(prepare):
            prepare(layout, device)


def _parameters(fn, skip: int, what: str) -> tuple[dict, bool]:
    """Keyword-usable parameters of `fn` after its first `skip` positional ones, and whether it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < skip and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{what} must take (q, k, v, layout) first")
    skipped = positional[:skip]
    rest = {p.name: p for p in params if p not in skipped and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return rest, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_options(name: str, options: dict, params: dict, var_keyword: bool) -> None:
    takes = sorted(set(params) - set(_CONTEXT))
    unknown = sorted(set(options) - set(takes))
    if unknown and not var_keyword:
        accepted = ", ".join(takes) if takes else "no options of its own"
        raise ValueError(
            f"attention method {name!r} does not take option(s) {', '.join(unknown)}; it takes: {accepted} "
            f"(and the adapter takes {', '.join(ADAPTER_OPTIONS)})"
        )
    missing = sorted(n for n in takes if params[n].default is inspect.Parameter.empty and n not in options)
    if missing:
        raise ValueError(f"attention method {name!r} needs option(s) {', '.join(missing)}")


def bind_method(name: str, options: dict, num_layers: int) -> list[LayerMethod]:
    """One `LayerMethod` per self-attention layer; ValueError for options the method does not take."""
    method = get_method(name)
    given_context = sorted(set(options) & set(_CONTEXT))
    if given_context:
        raise ValueError(f"option(s) {', '.join(given_context)} are set by the adapter, not by the caller")
    if isinstance(method, type):
        params, var_keyword = _parameters(method.__init__, 1, f"{name!r}.__init__")
        call_params, _ = _parameters(method.__call__, 5, f"{name!r}.__call__")
        _check_options(name, options, params, var_keyword)
        takes_layer = "layer_index" in params
        layers = []
        for i in range(num_layers):
            instance = method(**options, **({"layer_index": i} if takes_layer else {}))
            reset = getattr(instance, "reset", None)
            # An instance may say it has no use for the step this time (`uses_step = False`).
            takes_step = "step" in call_params and getattr(instance, "uses_step", True)
            layers.append(LayerMethod(instance, {}, takes_step, reset if callable(reset) else None,
                                      "return_lse" in call_params))
        return layers
    params, var_keyword = _parameters(method, 4, f"attention method {name!r}")
    _check_options(name, options, params, var_keyword)
    takes_layer = "layer_index" in params
    return [
        LayerMethod(method, {**options, **({"layer_index": i} if takes_layer else {})}, "step" in params,
                    takes_lse="return_lse" in params)
        for i in range(num_layers)
    ]


def _dense_layer_set(dense_layers, num_layers: int) -> set[int]:
    if isinstance(dense_layers, int):
        dense_layers = (dense_layers,)
    chosen = set()
    for index in dense_layers:
        if not -num_layers <= int(index) < num_layers:
            raise ValueError(f"dense_layers index {index} is out of range for {num_layers} self-attention layers")
        chosen.add(int(index) % num_layers)
    return chosen


def _pre_hook(family, state: AdapterState, module, args, kwargs):
    layout = family.layout(module, args, kwargs, state.block_size)
    if layout is not None and layout != state.layout:
        # Methods build what depends only on the layout here, outside any compiled block.
        device = family.device(args, kwargs)
        for layer_method in state.layer_methods:
            layer_method.prepare(layout, device)
    state.set_layout(layout)
    state.observe_timestep(family.timestep(args, kwargs))
    return None


def apply(transformer, method: str, **options):
    """Runs `method` in every self-attention layer of `transformer` (see `SparseOptions` for the shared options).

    Applying again replaces the previous method. Returns the transformer.
    """
    family = find_family(transformer)
    adapter_options = {k: options.pop(k) for k in ADAPTER_OPTIONS if k in options}
    warmup = int(adapter_options.get("dense_warmup_steps", SparseOptions.dense_warmup_steps))
    if warmup < 0:
        raise ValueError(f"dense_warmup_steps must be >= 0, got {warmup}")
    block_size = int(options.get("block_size", SparseOptions.block_size))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    modules = family.self_attention_modules(transformer)
    dense = _dense_layer_set(adapter_options.get("dense_layers", ()), len(modules))
    # Everything that can fail happens before the model is touched.
    layer_methods = bind_method(method, options, len(modules))

    remove(transformer)
    state = AdapterState(method, dict(options, **adapter_options), warmup_steps=warmup, block_size=block_size)
    state.layer_methods = layer_methods
    state.reset()
    for i, module in enumerate(modules):
        original = module.processor
        state.originals.append((module, original))
        _set_processor(module, family.make_processor(original, state, layer_methods[i], i, i in dense))
    hook = functools.partial(_pre_hook, family, state)
    state.hook = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(transformer, _STATE_ATTR, state)
    return transformer


def remove(transformer):
    """Restores the processors `apply` replaced (the same objects) and removes its hook. No-op if none applied."""
    state = getattr(transformer, _STATE_ATTR, None)
    if state is None:
        return transformer
    for module, original in state.originals:
        _set_processor(module, original)
    state.hook.remove()
    delattr(transformer, _STATE_ATTR)
    return transformer


def reset(transformer) -> None:
    """Starts a new generation: step 0 (warm-up runs again) and stateful methods cleared."""
    state = getattr(transformer, _STATE_ATTR, None)
    if state is not None:
        state.reset()


def current_method(transformer) -> str | None:
    state = getattr(transformer, _STATE_ATTR, None)
    return None if state is None else state.method


def adapter_state(transformer) -> AdapterState | None:
    """The live state (layout, step) of an applied method, for methods and tools that need to look at it."""
    return getattr(transformer, _STATE_ATTR, None)


def _set_processor(module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor
