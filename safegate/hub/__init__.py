"""Bundles: the safetensors files that carry a trained gate, strict loading, the Hugging Face Hub, `safegate info`."""
