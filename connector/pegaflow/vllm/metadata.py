"""What the scheduler tells the workers each step (pickled by vLLM, so plain data only).

The scheduler sends token ids, not keys: every worker chains keys from its own namespace
(its tp rank and layout), and keeps the chain per request, so each token crosses once.

`PegaMetadata` does not derive from vLLM's `KVConnectorMetadata`: that class is empty, vLLM only
annotates with it and never checks it, and importing it loads all of vLLM (20 s on a 2-core
VM). Without it the connector's halves import without vLLM, which engines driven without vLLM
(scenarios/gpu's paged engine and its CI smoke test) rely on.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ChainExtension:
    """Tokens of whole blocks `[first_block, ...)` of a request, appended to its key chain."""

    req_id: str
    first_block: int
    token_ids: list[int]


@dataclasses.dataclass
class Transfer:
    """Blocks `[first_block, first_block + len(block_ids))` of a request, and where they live."""

    req_id: str
    first_block: int
    block_ids: list[int]


@dataclasses.dataclass
class PegaMetadata:
    chains: list[ChainExtension] = dataclasses.field(default_factory=list)
    loads: list[Transfer] = dataclasses.field(default_factory=list)
    saves: list[Transfer] = dataclasses.field(default_factory=list)
