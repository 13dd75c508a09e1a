"""ReFT interventions to attach to a model (LoReFT, DiReFT): the public face of
fxlora/kinds/reft/modules.py (docs/reft.md)."""

from fxlora.kinds.reft.modules import DiReftIntervention, LoReftIntervention, ReftLinear, attach_reft

__all__ = ["DiReftIntervention", "LoReftIntervention", "ReftLinear", "attach_reft"]
