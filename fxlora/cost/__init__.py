"""The cost model shared by every adapter kind: one Form type, one substitution, one chooser.

Each kind writes its own formulas (fxlora/kinds/<kind>/forms.py, next to the paper's table
they come from) in the symbols of `core`; nothing here knows a kind.
"""
