"""What computes: the model config, the Llama decoder, linear layers with their quantization scheme,
and the attention metadata a forward pass takes. Imports only kernels/ (never triton itself)."""
