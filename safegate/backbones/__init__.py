"""Backbones: `load_model` for every model id the library accepts, and the real models shipped in wheels."""
