"""A composed bundle's named risks as served outputs: ``risk_aleatoric``, ``risk_epistemic``, ``risk_novelty``.

A composed model (``vote(sculpt(model))``) returns a `capsa.Risk`. The server serves its ``total`` as ``risk`` (and
``risk_score`` from it, `capsa.risk_score`), and each component the stack has as ``risk_<kind>``, shaped like
``prediction``. Which ones a version has is what its capsa.json lists (`capsa.save_bundle` writes them), read here
without torch; the worker returns them with each batch (``Outputs.components``). Like the calibrated outputs
(:mod:`service.calibrated`) they come after the base outputs in the model metadata, are selectable with ``outputs``
and are part of the answer (V2 and V1) when the request names no outputs. A single-wrapper bundle has none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from service.protocol import ProtocolError

__all__ = ["COMPONENT_OUTPUTS", "component_names", "component_specs", "unknown_output"]

#: ``"risk_" + kind`` for each of ``capsa._risk.KINDS``, in that order (kept torch-free here; a test ties the two).
COMPONENT_OUTPUTS: tuple[str, ...] = ("risk_aleatoric", "risk_epistemic", "risk_novelty")


def component_specs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The V2 metadata (``{name, datatype, shape}``) of the risk components capsa.json ``meta`` lists, in
    `COMPONENT_OUTPUTS` order; empty for a single-wrapper bundle."""
    listed = {t["name"]: t for t in meta.get("outputs", ()) if isinstance(t, dict) and "name" in t}
    return [{"name": n, "datatype": listed[n]["datatype"], "shape": list(listed[n]["shape"])}
            for n in COMPONENT_OUTPUTS if n in listed]


def component_names(meta: dict[str, Any]) -> tuple[str, ...]:
    """The names of the risk components a version serves (see :func:`component_specs`)."""
    return tuple(spec["name"] for spec in component_specs(meta))


def unknown_output(name: str, served: Iterable[str]) -> ProtocolError:
    """The 400 for an output this version does not serve, naming it and what the version serves."""
    served = list(served)
    if name in COMPONENT_OUTPUTS:
        kind = name.removeprefix("risk_")
        return ProtocolError(f"output '{name}' does not exist for this model: its risk has no {kind} component "
                             f"(the wrappers in its stack do not give one); outputs are {served}")
    return ProtocolError(f"output '{name}' does not exist; outputs are {served}")
