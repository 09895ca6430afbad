"""PyTorch networks (CLIP text encoder, UNet, VAE) and the torch backend: CUDA, MPS or CPU.

The modules mirror the MLX ones and diffusers' parameter names; tensors are NCHW.
"""
