"""The state every adapter processor that hands calls to a method keeps, and the settings it passes through."""

from __future__ import annotations


class MethodProcessor:
    """original: the module's processor before `attention.apply` (it serves the calls the method does not, and is
    put back by `attention.remove`). state: the shared AdapterState. method: the layer's bound method.
    dense: the layer is kept dense."""

    def __init__(self, original, state, method, layer_index: int, dense: bool):
        self.original = original
        self.state = state
        self.method = method
        self.layer_index = layer_index
        self.dense = dense

    # diffusers' `set_attention_backend` and `enable_parallelism` set these on whatever processor a module holds.
    # The original keeps them, whichever was installed first, so the calls it serves use them (diffusers' own
    # parallel attention on the model's backend) and `attention.remove` hands them back with it.
    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.original._attention_backend = backend

    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config):
        self.original._parallel_config = config
