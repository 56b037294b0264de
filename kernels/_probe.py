"""A tiny kernel with the loop shape of the real ones, to check the Triton interpreter works.

(Triton 3.6's interpreter fails on loops whose bounds are computed at run time when NumPy is
2.3 or newer; _runtime.interpreter_works() runs this once and reports.)
"""
import triton
import triton.language as tl


@triton.jit
def loop_probe(out_ptr, n, STEP: tl.constexpr):
    start = tl.program_id(0) * n
    end = tl.minimum(start + n, 2 * n)
    acc = n * 0
    for i in range(start, end, STEP):
        acc += 1
    tl.store(out_ptr, acc)
