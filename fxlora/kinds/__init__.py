"""The adapter kinds fxlora knows, in the order the pipeline runs them (first match wins).

Adding a kind: a package beside these with the contract `Kind.of` reads, one line here,
its op in fxlora/ops/, and its tests (fxlora/kinds/README.md).
"""

from fxlora.kinds import ia3, lora, reft, vera
from fxlora.kinds.base import Kind

KINDS: tuple[Kind, ...] = tuple(Kind.of(package) for package in (lora, ia3, vera, reft))
KIND_NAMES = tuple(k.name for k in KINDS)
