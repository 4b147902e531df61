"""The serving contract both processes share (the gateway and the TorchServe worker), below both of them.

- :mod:`~neuroexplain.serving.types` — request, result and progress types (frozen dataclasses, enums; no torch);
- :mod:`~neuroexplain.serving.codec` — the one codec for them (gateway <-> worker, and cached results);
- :mod:`~neuroexplain.serving.catalog` — :class:`ModelInfo` from ``spec.json`` and the option tables, without torch;
- :mod:`~neuroexplain.serving.cancel` — cancel flags between the gateway and a busy worker;
- :mod:`~neuroexplain.serving.tuning` — the OpenMP and allocator settings of the processes that run models;
- :mod:`~neuroexplain.serving.runner` — the per-operation library calls (imports torch; import it explicitly).

Nothing here imports grpc, protobuf, ``service`` or ``handlers``.
"""
