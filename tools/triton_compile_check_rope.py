"""Compile the joint QK/RoPE Triton kernel for sm_90 on a CPU-only machine (no launch) and count
16-byte global loads/stores in the PTX. Usage: PYTHONPATH=. python tools/triton_compile_check_rope.py"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_dit_ops.kernels.rope import _joint_qk_kernel as k
import inspect
names = list(inspect.signature(k.fn).parameters)
ptrs = {'aq','ak','av','bq','bk','bv','oq','ok','ov','wqa','wka','wqb','wkb','ca','cb','pa','pb'}
def compile_variant(**cx):
    sig = {}
    for n in names:
        if n in cx: sig[n] = 'constexpr'
        elif n in ptrs:
            sig[n] = '*fp32' if n in ('ca','cb') else ('*i64' if n in ('pa','pb') else '*bf16')
        elif n == 'eps': sig[n] = 'fp32'
        else: sig[n] = 'i64'
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(names) if sig[n] != 'constexpr' and n not in ('La','H','Pa','Pb','eps')}
    src = ASTSource(fn=k, signature=sig, constexprs={(names.index(n),): v for n, v in cx.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = c.asm['ptx']
    print({k2: v for k2, v in cx.items() if k2 in ('NORM','ROPE','INTERLEAVED','HAS_V','POS_A')}, 'ok; ptx lines', ptx.count('\n'),
          'ld.global.v4', ptx.count('ld.global.v4') + ptx.count('ld.global.nc.v4'), 'st.global.v4', ptx.count('st.global.v4'), 'regs', c.n_regs if hasattr(c,'n_regs') else '?')
base = dict(D=128, D_BLOCK=128, HALF=64, HALF_BLOCK=64, TAIL=0, TAIL_BLOCK=1, BLOCK_H=8, ROUND=True, POS_A=False, POS_B=False)
compile_variant(**base, INTERLEAVED=True, NORM=True, ROPE=True, HAS_V=True)
compile_variant(**base, INTERLEAVED=False, NORM=True, ROPE=True, HAS_V=True)
compile_variant(**{**base, 'POS_A': True}, INTERLEAVED=True, NORM=False, ROPE=True, HAS_V=False)
compile_variant(**base, INTERLEAVED=True, NORM=False, ROPE=False, HAS_V=True)
compile_variant(**{**base, 'HALF': 8, 'HALF_BLOCK': 8, 'TAIL': 112, 'TAIL_BLOCK': 128}, INTERLEAVED=False, NORM=True, ROPE=True, HAS_V=True)
