"""Plain tensor functions behind some layers (pure PyTorch references for the native kernels)."""
