"""Weight formats: canonical (on-disk) layouts and the kernels' packed layouts."""
