"""MLX networks (CLIP text encoder, UNet, VAE, motion modules, UNet3D) and the MLX backend.

Importing this package first loads a system OpenBLAS for MLX's Linux CPU build (see ``_blas``); it
happens here, not when ``mlx_stablefused`` is imported, so torch-only users never load it.
"""

from ..._blas import preload_openblas

preload_openblas()
