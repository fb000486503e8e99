"""Command-line converter; the same as ``python -m mlx_gemma_mtp.convert``."""

from mlx_gemma_mtp.convert import main

if __name__ == "__main__":
    main()
