"""MLX networks (CLIP text encoder, UNet, VAE) and the MLX backend."""
