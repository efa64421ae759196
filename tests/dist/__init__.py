"""Scripts that tests run under torchrun (gloo, CPU), and the CPU shim megatron-core needs there."""
