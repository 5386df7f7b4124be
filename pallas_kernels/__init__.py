"""The LUT matmul kernels: GPU (Pallas, Triton backend, with a pure-jnp reference) and CPU
(C++ through the XLA FFI, built on first use). Imports nothing from any4_jax."""
