"""TensorRT: the operator check and build plan (checked here, no GPU), the engine build (on a GPU machine)."""
