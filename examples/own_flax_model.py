"""Quantize your own Flax model: its nn.Dense layers become 4-bit, its code stays as it is.

    python examples/own_flax_model.py [--steps 300]

A small MLP is trained (optax) to classify points of a two-spirals data set,
then quantized with any4 and nf4 (calibrated on a batch of inputs), and the
accuracies are compared.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from any4_jax.quantize import quantize_model


class MLP(nn.Module):  # the user's model: plain nn.Dense, nothing any4-specific
    hidden: int = 256

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(self.hidden)(x))
        x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(2)(x)


def spirals(n, seed):
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    r = t * np.where(label, 1, -1)
    x = np.stack([r * np.cos(t), r * np.sin(t)], 1) / 10 + rng.normal(0, 0.02, (n, 2))
    features = np.concatenate([x, np.sin(3 * x), np.cos(3 * x)], 1)  # a few fixed features
    return jnp.asarray(features, jnp.float32), jnp.asarray(label)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    x, y = spirals(4000, 0)
    x_test, y_test = spirals(2000, 1)
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(args.steps):
        params, state, loss = step(params, state)

    float_logits = model.apply({"params": params}, x_test)
    accuracy = lambda logits: float((logits.argmax(-1) == y_test).mean())
    print(f"{'model':<6}{'test accuracy':>15}{'|logits - float| / |float|':>29}")
    print(f"{'float':<6}{accuracy(float_logits):>15.3f}{0.0:>29.4f}")
    for fmt in ("any4", "nf4", "int4", "any2", "int2"):
        # calibration: a batch of real inputs (no tokenizer needed); group size 32 fits K = 6 and 256
        qmodel, qparams = quantize_model(model, params, fmt=fmt, group_size=32, skip=(),
                                         calibration=x[:512], progress=False)
        logits = qmodel.apply({"params": qparams}, x_test)
        error = float(jnp.abs(logits - float_logits).mean() / jnp.abs(float_logits).mean())
        print(f"{fmt:<6}{accuracy(logits):>15.3f}{error:>29.4f}")

if __name__ == "__main__":
    main()
