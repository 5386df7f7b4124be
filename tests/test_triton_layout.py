"""What the GPU kernel's inline assembly assumes of Triton, read from Triton's own
GPU IR: each call (pack = 4) gets 4 K-consecutive code bytes of one row as a
word, and its 16-bit outputs land on the same elements. The kernel is lowered by
jax (without a GPU: jaxlib 0.10) and compiled for sm_90 by PyPI Triton, whose
layout passes decide this. PyPI Triton is not necessarily the Triton inside
jaxlib: this raises confidence; the kernel's self-check on the GPU
(``lut_matmul.self_check``) is what protects users."""

import os
import re

import jax
import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default; set, so that it does not warn

triton = pytest.importorskip("triton", reason="PyPI Triton is not installed here (pip install triton, x86-64 "
                                               "Linux): the layout Triton chooses cannot be read")
import jaxlib  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration  # noqa: E402  (where Pallas hands Triton its IR)

from pallas_kernels import lut_matmul as lm  # noqa: E402

if tuple(int(v) for v in jaxlib.__version__.split(".")[:2]) >= (0, 11) and jax.default_backend() != "gpu":
    pytest.skip(f"jaxlib {jaxlib.__version__} lowers Pallas for CUDA only on a GPU", allow_module_level=True)


def ttgir(m, n, k, group_size, bits, tmp_path) -> str:
    """Triton's GPU IR (after its layout passes) of the kernel for this shape."""
    fn, args, info = lm.static_entry(m, n, k, group_size, bits, strategy="prmt")
    captured = []
    lowering = pallas_call_registration.lowering
    real = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        module = real(*a, **kw)
        captured.append(module.module.operation.get_asm())
        return module

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = real
    assert len(captured) == 1, "one kernel"
    path = tmp_path / f"k{m}_{group_size}_{bits}.ttir"
    path.write_text(captured[0])
    from triton.backends.compiler import GPUTarget
    config = info["config"]
    compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    return compiled.asm["ttgir"]


def layouts(text: str) -> dict:
    return dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", text, re.M))


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("group_size, bits", [(128, 4), (32, 4), (256, 3), (4096, 2), (32, 3), (128, 2)])
def test_each_inline_asm_call_gets_four_k_consecutive_bytes_of_a_row(m, group_size, bits, tmp_path):
    text = ttgir(m, 4096, 4096, group_size, bits, tmp_path)
    defs = layouts(text)
    calls = [line for line in text.splitlines() if "tt.elementwise_inline_asm" in line]
    block_k = lm.block_sizes(m, 4096, 4096, group_size, bits).block_k
    fuse = 1 if group_size < block_k else block_k // 64
    # one lookup a half of a code tile (outputs o0, o1 and o2, o3); 2 and 3 bits: a tile a q
    # (the low plane's bits 0-1/4-5 and 2-3/6-7), 3 bits: a tile a code block
    assert len(calls) == {4: 2, 2: 4, 3: 4 * fuse}[bits], len(calls)
    for call in calls:
        assert "packed_element = 4" in call, call[-300:]
        signature = call[call.rindex("} : ") if "} : " in call else call.rindex(" : "):]
        operands, result = signature.split("->")
        types = re.findall(r"tensor<(\d+)x(\d+)x(\w+), (#[\w.]+(?:<[^>]*>)?)>", operands)
        out = re.findall(r"tensor<(\d+)x(\d+)x(\w+), (#[\w.]+(?:<[^>]*>)?)>", result)
        assert len(types) == 9 and len(out) == 1, signature  # the code bytes and eight table registers
        assert {t[2] for t in types} == {"i8"} and out[0][2] in ("bf16", "f16")
        assert {t[3] for t in types} == {out[0][3]}, "the outputs sit on the elements their codes came from"
        layout = defs.get(out[0][3], out[0][3])
        if layout.startswith("#ttg.blocked"):
            size = [int(v) for v in re.search(r"sizePerThread = \[([\d, ]+)\]", layout).group(1).split(",")]
            order = [int(v) for v in re.search(r"order = \[([\d, ]+)\]", layout).group(1).split(",")]
            assert order[0] == 1 and size[1] % 4 == 0, f"K is not a thread's fastest dimension in 4s: {layout}"
        else:
            assert re.search(r"dot_op<.*kWidth = (4|8|16)", layout), f"an unexpected layout: {layout}"
