"""The inference core: `attach`, `SafeGateModel`, the gate, the safety tokens, hooks and the decoding path.

It imports no other safegate subpackage (see `docs/architecture.md`).
"""
