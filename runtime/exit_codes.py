"""The exit codes of gemma-export, gemma-parity and gemma-run: what a CI job can rely on."""

OK = 0
FAILED = 1  # parity failed, a build failed, or something went wrong while running (the log has the traceback)
USAGE = 2  # bad input: a path, a model type, an option, an artifact that cannot be used as it is
NO_TENSORRT = 3  # TensorRT or an NVIDIA GPU is missing for what was asked
