"""Model building blocks: linear layers with pluggable quantization, rotary embedding, norms, activations."""
