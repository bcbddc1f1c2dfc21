"""pinfm_rec.kernels: custom GPU kernels (Triton) with PyTorch fallbacks."""
