"""The table of built-in methods: objective name -> its :class:`~vidssl.models.objective.Objective` class.

Each class carries its own ``Params`` dataclass (next to the model, in ``vidssl/models/<method>.py``). Methods from
outside vidssl join through :func:`vidssl.engine.register_objective`, a ``--plugin module.path`` or the
``vidssl.objectives`` entry-point group; none of them needs an edit here.
"""

from __future__ import annotations

from vidssl.models.corrflow import CorrFlow
from vidssl.models.cpc import CPC
from vidssl.models.dpc import DPC
from vidssl.models.gim import GIM
from vidssl.models.crw import CRW
from vidssl.models.instance import InstanceDiscrimination
from vidssl.models.mast import MAST
from vidssl.models.objective import Objective
from vidssl.models.timecycle import TimeCycle
from vidssl.models.vivi import VIVI


def builtin_methods() -> dict[str, type[Objective]]:
    """A fresh copy of the built-in table."""
    return {
        "crw": CRW,  # Jabri et al. 2020, contrastive random walk
        "corrflow": CorrFlow,  # Lai & Xie 2019, Correspondence Flow
        "cpc": CPC,  # van den Oord et al. 2018, image-mode CPC end to end (GIM's vision loss)
        "dpc": DPC,  # Han, Xie, Zisserman 2019, Dense Predictive Coding (video CPC)
        "gim": GIM,  # Loewe et al. 2019, Greedy InfoMax (per-module CPC, joint/sequential/pipelined)
        "mast": MAST,  # Lai, Lu, Xie 2020, memory-augmented self-supervised tracker
        "timecycle": TimeCycle,  # Wang, Jabri, Efros 2019, cycle-consistency of time
        "vivi": VIVI,  # Tschannen et al. 2020, video-induced visual invariances (shots)
        "instance": InstanceDiscrimination,  # SimCLR / MoCo v2 / Wu et al. memory bank over two frames of a clip
    }


__all__ = ["builtin_methods"]
