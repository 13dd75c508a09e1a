"""The adapter kinds fxlora knows, in the order the pipeline runs them (first match wins).

Adding a kind: a package beside these that builds its `KIND` (fxlora/kinds/README.md), one
entry here, its op in fxlora/ops/, and its tests.
"""

from fxlora.kinds import dora, ia3, lora, reft, vera
from fxlora.kinds.base import Kind

KINDS: tuple[Kind, ...] = (dora.KIND, lora.KIND, ia3.KIND, vera.KIND, reft.KIND)
