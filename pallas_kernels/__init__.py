"""GPU kernels (Pallas, Triton backend) with pure-jnp references. Imports nothing from any4_jax."""
