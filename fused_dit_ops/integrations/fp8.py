"""``patch(model, precision="fp8")``: the double-stream blocks' Linears as FP8 (e4m3) GEMMs (the
other block kinds: :mod:`.fp8_kinds`, on the same state, weight records and offload).

Per patched double-stream block and stream, four GEMMs run as ``fused_dit.fp8_linear`` /
``joint_fp8_linear`` (``torch._scaled_mm`` on CUDA, row-wise scales): q|k|v (one packed weight),
the attention output projection, MLP fc1 and fc2. Their inputs are quantised by the op that
produces them, in the same pass:

- norm1 + modulation: ``dual_norm_scale_shift_fp8`` (or the previous block's look-ahead
  ``dual_gate_residual_norm_scale_shift_fp8``);
- attention output: ``quantize_fp8`` (one pass over the joint output);
- gated residual + norm2 + modulation: ``dual_gate_residual_norm_scale_shift_fp8``;
- fc1 output: ``quantize_fp8(h, fc1.bias, "gelu_tanh")`` (bias + GELU-tanh + quantisation, one pass);
  a SwiGLU MLP (FLUX.2: ``linear_in``, SwiGLU, ``linear_out``): ``quantize_fp8_cat(None, h, "swiglu")``.

Modulation GEMVs, embeddings and the final projection stay in the model dtype.

``patch``'s ``fp8_fast_accum`` (True by default with ``precision="fp8"``; kept as ``Fp8State.fast_accum``)
is the ``fast_accum`` of every FP8 GEMM here and in ``fp8_kinds``: ``torch._scaled_mm(use_fast_accum=...)``
on CUDA; the CPU reference accumulates in fp32 either way.

Weights are quantised once at patch time (per output channel, ``amax / 448``) into non-persistent
buffers of the block (``_fused_dit_fp8_*``: not in ``state_dict``; they follow ``model.to(device)``).
On CUDA the original bf16 weights of those Linears move to pinned CPU memory while patched (unless
``keep_bf16_weights=True`` or ``verify=True``); :func:`unpatch` copies them back, bit for bit. While
they are on the CPU, a forward that would need the stock code (a padded text mask, autograd) raises
instead of running it.

Under diffusers' context parallelism each rank runs this path (and the other kinds', ``fp8_kinds``)
on its shard of the sequence: the GEMMs and the quantising ops are per token; the attention goes
through ``engine.cp_attention`` (diffusers' all-to-all / ring) on model-dtype q, k, v, so FP8
attention (``attention_precision="fp8"``) does not apply there (counted in ``report.runtime``).

Requirements (else the model stays bf16 on the fused ops, with the reason in ``report.stock``):
CUDA compute capability 8.9+ and bfloat16 (CPU: any dtype, the reference implementations), all
fused ops selected, the Linears plain ``nn.Linear`` with in/out features multiples of 16, the MLP
a GELU-tanh FeedForward or a SwiGLU one. A block whose Linears changed after patching (LoRA, replaced or edited
weights) runs the bf16 fused path, counted in ``report.runtime``.
"""
from __future__ import annotations

import torch

from ..ops import _eager
from ..ops.fp8 import quantize_weight
from . import double_stream as DS
from . import engine as E
from .fp8_weights import PREFIX, _buf, _links, ready

# buffer names per stream: <prefix><stream>_<what>_{w,s[,b]}
_GEMMS = ("qkv", "out", "fc1", "fc2")


class Fp8State:
    """What precision="fp8" added to a patched model."""

    def __init__(self, offload: bool, fast_accum: bool = False):
        self.offload = offload
        self.fast_accum = fast_accum  # fp8_fast_accum: every FP8 GEMM with torch._scaled_mm's use_fast_accum
        # id(block) -> (links, records): links (parent, key, child) from the block down to every
        # quantised Linear; records (Linear, weight, its version, bias, its version)
        self.blocks: dict = {}
        self.offloaded: list = []  # (Parameter, its block): bf16 weights moved to pinned CPU memory

    # what the engine and the double-stream block call (through the state: they do not import this module)
    def usable(self, block, st, h, e) -> bool:
        return usable(block, st, h, e)

    def run_block(self, block, st, h, e, temb, rot, index):
        return run_block(block, st, h, e, temb, rot, index)

    def check_bf16_path(self, block, st):
        check_bf16_path(block, st)

    def stock_unavailable(self, st) -> str | None:
        return stock_unavailable(st)

    def unpatch(self, st):
        unpatch(st)

    # the other block kinds (integrations/fp8_kinds.py): the FP8 block output, or None after checking
    # that the model-dtype path may run (then the caller runs it)
    def run_single(self, block, st, x, Lt, temb, rot):
        from . import fp8_kinds as K
        if K.single_usable(block, st, x):
            return K.run_single(block, st, x, Lt, temb, rot)
        check_bf16_path(block, st)
        _drop_fp8_prenorm(st)
        return None

    def run_self_cross(self, block, st, x, ctx, temb, rot, index):
        from . import fp8_kinds as K
        if K.self_cross_usable(block, st, x):
            return K.run_self_cross(block, st, x, ctx, temb, rot, index)
        check_bf16_path(block, st)
        _drop_fp8_prenorm(st)
        return None


def _drop_fp8_prenorm(st):
    if st.prenorm is not None and isinstance(st.prenorm.outs[0], tuple):
        st.prenorm = None  # FP8 look-ahead outputs are for the FP8 path


def _paths(block, fam, s):
    """{gemm: [modules]} of one stream, or a reason string."""
    attn = getattr(block, fam.attn)
    qkv = [E.get(attn, p) for p in (s.q, s.k, s.v)]
    out = E.get(attn, s.out)
    ff = getattr(block, s.mlp, None)
    mlp = _swiglu_mlp(ff, fam, s) if fam.mlp == "swiglu" else _gelu_mlp(ff, s)
    if isinstance(mlp, str):
        return mlp
    fc1, fc2 = mlp
    lins = {"qkv": qkv, "out": [out], "fc1": [fc1], "fc2": [fc2]}
    for g, ms in lins.items():
        for m in ms:
            if not E.plain_linear(m):
                return f"{s.name} {g}: not a plain nn.Linear (LoRA, hooks, quantised weights)"
            if m.in_features % 16 or m.out_features % 16:
                return (f"{s.name} {g}: in/out features {m.in_features}/{m.out_features} not multiples of 16 "
                        "(torch._scaled_mm)")
    if len({m.weight.dtype for m in qkv}) != 1 or len({m.in_features for m in qkv}) != 1:
        return f"{s.name} q/k/v: mixed dtypes or input sizes"
    head, _, idx = s.out.partition(".")
    if idx:
        rest = E.children(getattr(attn, head))[int(idx) + 1:]
        if not all(E.skippable_dropout(m) for m in rest):
            return f"{fam.attn}.{head}: modules after the output projection that are not inactive Dropout"
    return lins


def _gelu_mlp(ff, s):
    """(fc1, fc2) of a diffusers FeedForward(GELU-tanh), or a reason string."""
    net = getattr(ff, "_modules", {}).get("net")
    mods = E.children(net) if net is not None else []
    from diffusers.models.activations import GELU
    if (len(mods) not in (3, 4) or type(mods[0]) is not GELU or mods[0].approximate != "tanh"
            or not E.skippable_dropout(mods[1]) or (len(mods) == 4 and not E.skippable_dropout(mods[3]))):
        return f"{s.mlp} is not FeedForward(GELU-tanh proj, Dropout, Linear[, Dropout])"
    fc1, fc2 = mods[0]._modules.get("proj"), mods[2]
    if fc1 is None or fc1.bias is None:
        return f"{s.mlp}: the GELU projection has no bias (the fused GELU + quantisation adds it)"
    return fc1, fc2


def _swiglu_mlp(ff, fam, s):
    """(fc1, fc2) of a SwiGLU MLP (``linear_in`` [2F, C] gate rows first, the family's SwiGLU
    module, ``linear_out``; e.g. FLUX.2's Flux2FeedForward), or a reason string."""
    m = getattr(ff, "_modules", {})
    fc1, act, fc2 = m.get("linear_in"), m.get("act_fn"), m.get("linear_out")
    acts = fam.mlp_act() if fam.mlp_act is not None else ()
    if fc1 is None or fc2 is None or type(act) not in acts or not E.no_hooks(act):
        return f"{s.mlp} is not (linear_in, SwiGLU, linear_out)"
    return fc1, fc2


def model_reason(st, dev, dtype):
    """Why this model cannot take FP8 at all (None: it can)."""
    missing = [o for o, on in (("modulation", st.modulation), ("qk_norm_rope", st.qk), ("attention", st.attention),
                               ("mlp", st.mlp)) if not on]
    if missing:
        return f"needs every fused op (ops='all'); missing {missing}"
    if st.qk_path != "joint":
        return "needs qk_path='joint'"
    if dev is None:
        return "no execution device"
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        if cap < (8, 9):
            return f"FP8 GEMMs need compute capability 8.9+ (Ada, Hopper), got {cap[0]}.{cap[1]}"
        if dtype != torch.bfloat16:
            return f"FP8 GEMMs with row-wise scales output bfloat16 on CUDA; the model is {dtype}"
    elif dev.type != "cpu":
        return f"device {dev.type} (CUDA 8.9+ or CPU reference only)"
    return None


def _should_offload(dev, keep_bf16) -> bool:
    """Move the quantised Linears' bf16 weights to (pinned) CPU memory while patched?"""
    return dev.type == "cuda" and not keep_bf16


@torch.no_grad()
def patch_blocks(st, blocks, report, dev, dtype, keep_bf16, others=None, fast_accum=False):
    """Quantise the weights of the patchable double-stream blocks (and of ``others``: {kind: blocks}
    of the other kinds, see ``fp8_kinds``); record and report. ``fast_accum``: the GEMMs' flag."""
    others = {k: v for k, v in (others or {}).items() if v}
    why = model_reason(st, dev, dtype)
    if why is None:
        devs = {t.device for b in [*blocks, *(x for v in others.values() for x in v)] for t in b.parameters()}
        if devs != {dev}:
            why = (f"the blocks' parameters are on {sorted(map(str, devs))} while the model computes on {dev} "
                   "(offloading hooks move them): FP8 needs the model on its execution device")
    if why:
        report.stock["precision"] = f"fp8 not applied ({why}): model dtype GEMMs"
        return
    fam = st.family
    offload = _should_offload(dev, keep_bf16)
    f8 = Fp8State(offload, fast_accum)
    skipped = {}
    for block in blocks:
        per = {s.name: _paths(block, fam, s) for s in fam.streams}
        bad = next((v for v in per.values() if isinstance(v, str)), None)
        if bad is not None:
            skipped[bad] = skipped.get(bad, 0) + 1
            continue
        rec = []
        for s in fam.streams:
            for g in _GEMMS:
                ms = per[s.name][g]
                w = torch.cat([m.weight.detach() for m in ms], 0) if len(ms) > 1 else ms[0].weight.detach()
                wq, ws = quantize_weight(w)
                block.register_buffer(f"{PREFIX}{s.name}_{g}_w", wq, persistent=False)
                block.register_buffer(f"{PREFIX}{s.name}_{g}_s", ws, persistent=False)
                if g == "qkv":
                    bs = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in ms]
                    has = any(m.bias is not None for m in ms)
                    block.register_buffer(f"{PREFIX}{s.name}_qkv_b", torch.cat(bs, 0) if has else None,
                                          persistent=False)
                rec += [(m, m.weight, E.version_of(m.weight), m.bias, E.version_of(m.bias) if m.bias is not None else 0)
                        for m in ms]
        f8.blocks[id(block)] = (_links(block, [m for r in rec for m in r[:1]]), rec)
    st.fp8 = f8
    n = len(f8.blocks)
    for why, k in skipped.items():
        report.stock[f"fp8 ({k} blocks)"] = f"{why}: model dtype GEMMs"
    if n:
        report.swapped.append(f"FP8 e4m3 GEMMs (row-wise scales; activations quantised by the ops that write "
                              f"them): q/k/v, output projections, MLP fc1/fc2 of both streams ({n} blocks)")
    if others:
        from . import fp8_kinds
        fp8_kinds.patch_blocks(st, f8, others, report)
    if not f8.blocks:
        return
    if fast_accum:
        report.swapped.append("FP8 GEMMs with fast accumulation (fp8_fast_accum=True, the default: "
                              "torch._scaled_mm's use_fast_accum on CUDA; the CPU reference accumulates in fp32)")
    if offload:
        nbytes = 0
        for block in [*blocks, *(x for v in others.values() for x in v)]:
            if id(block) not in f8.blocks:
                continue
            for m, p, *_ in f8.blocks[id(block)][1]:
                cpu = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=torch.cuda.is_available())
                cpu.copy_(p.data)
                f8.offloaded.append((p, block))
                p.data = cpu
                nbytes += cpu.numel() * cpu.element_size()
        # the q/k/v records changed their data pointers: refresh the version snapshot
        for bid, (links, rec) in f8.blocks.items():
            f8.blocks[bid] = (links, [(m, m.weight, E.version_of(m.weight), b, bv) for m, _, _, b, bv in rec])
        report.swapped.append(f"bf16 weights of those Linears kept on the CPU (pinned, {nbytes / 2**30:.2f} GiB) "
                              "while patched: unpatch copies them back exactly; the stock forward is unavailable "
                              "until then (keep_bf16_weights=True keeps them on the GPU)")
    elif dev.type == "cuda":
        report.swapped.append("bf16 weights stay on the GPU next to the FP8 copies (keep_bf16_weights or verify)")


@torch.no_grad()
def unpatch(st):
    f8 = getattr(st, "fp8", None)
    if f8 is None:
        return
    for p, block in f8.offloaded:
        # back to where the block is now (its FP8 buffers follow model.to(...); the weights did not)
        w = next((b for n, b in block._buffers.items() if n.startswith(PREFIX) and b is not None), None)
        dev = w.device if w is not None else None
        if dev is not None and p.device != dev:
            p.data = p.data.to(dev)
    f8.offloaded.clear()
    for block in st.patched_blocks:
        for name in [n for n in block._buffers if n.startswith(PREFIX)]:
            del block._buffers[name]
    f8.blocks.clear()
    st.fp8 = None


def stock_unavailable(st) -> str | None:
    """Why the stock forward cannot run now (bf16 weights on the CPU), or None."""
    f8 = getattr(st, "fp8", None)
    if f8 is not None and f8.offloaded:
        return ("precision='fp8' keeps the bf16 weights of the block Linears on the CPU while patched; "
                "unpatch first, or patch with keep_bf16_weights=True")
    return None


def check_bf16_path(block, st):
    """Raise when this block must leave the FP8 path but its bf16 weights are on the CPU."""
    f8 = st.fp8
    if f8 is not None and f8.offloaded and id(block) in f8.blocks and not torch.compiler.is_compiling():
        raise RuntimeError("fused_dit_ops: this block cannot run its FP8 path now (see report.runtime: modules "
                           f"or weights changed, hooks, stock mode) and {stock_unavailable(st)}")


# --- forward ----------------------------------------------------------------------------------------

def _stream_out(attn, s):
    head, _, idx = s.out.partition(".")
    return E.children(getattr(attn, head))[int(idx)] if idx else getattr(attn, head)


def _attention(block, st, attn, iq, isc, tq, tsc, tables, dtype):
    fam = st.family
    si, stx = fam.streams
    B, Lt = tq.shape[0], tq.shape[1]
    img_tab, txt_tab = (tables[Lt:], tables[:Lt]) if fam.rope_joint else tables
    hd = attn.inner_dim // attn.heads
    norms = [getattr(attn, n) for n in (stx.q_norm, stx.k_norm, si.q_norm, si.k_norm)]
    fa = st.fp8.fast_accum
    buf = _eager.joint_fp8_linear_unchecked(
        tq, tsc, iq, isc, _buf(block, f"{stx.name}_qkv_w"), _buf(block, f"{stx.name}_qkv_s"),
        _buf(block, f"{stx.name}_qkv_b"), _buf(block, f"{si.name}_qkv_w"), _buf(block, f"{si.name}_qkv_s"),
        _buf(block, f"{si.name}_qkv_b"), dtype, fast_accum=fa)
    c = [0]
    for p in (si.q, si.k, si.v):
        c.append(c[-1] + E.get(attn, p).out_features)
    q, k, v = (buf[..., c[j]:c[j + 1]].unflatten(-1, (-1, hd)) for j in range(3))
    weights, eps = [n.weight for n in norms], getattr(attn, si.q_norm).eps
    proc = attn.processor
    # attention_precision="fp8" (not under context parallelism: usable() counts that call)
    if st.attn_fp8 is not None and st.attn_fp8.usable(st, proc):
        out = st.attn_fp8.attention(q, k, v, Lt, weights, txt_tab, img_tab, eps, fam.rope_interleaved)
    else:
        _eager.joint_qk_norm_rope_(q, k, Lt, *weights, txt_tab, img_tab, eps, fam.rope_interleaved)
        # context parallelism: diffusers' all-to-all / ring over this rank's rows (None without it)
        out = E.cp_attention(q, k, v, proc)
        if out is None:
            out = _eager.attention_unchecked(q, k, v, None, False, proc.backend)
    out = out.flatten(2, 3).to(dtype)
    if B == 1:  # one pass over the joint output; row views per stream
        oq, osc = _eager.quantize_fp8(out)
        t8, i8 = (oq[:, :Lt], osc[:, :Lt]), (oq[:, Lt:], osc[:, Lt:])
    else:  # per stream (contiguous outputs: the GEMM takes each stream's rows as one matrix)
        t8, i8 = _eager.quantize_fp8(out[:, :Lt]), _eager.quantize_fp8(out[:, Lt:])
    img_o, txt_o = _stream_out(attn, si), _stream_out(attn, stx)
    img_out = _eager.fp8_linear_unchecked(*i8, _buf(block, f"{si.name}_out_w"), _buf(block, f"{si.name}_out_s"),
                                          img_o.bias, dtype, fast_accum=fa)
    txt_out = _eager.fp8_linear_unchecked(*t8, _buf(block, f"{stx.name}_out_w"), _buf(block, f"{stx.name}_out_s"),
                                          txt_o.bias, dtype, fast_accum=fa)
    return img_out, txt_out


def _mlp(block, s, q, qs, dtype, fa):
    ff = getattr(block, s.mlp)
    if "linear_in" in ff._modules:  # SwiGLU: the activation and the quantisation of fc2's input in one pass
        h = _eager.fp8_linear_unchecked(q, qs, _buf(block, f"{s.name}_fc1_w"), _buf(block, f"{s.name}_fc1_s"),
                                        ff.linear_in.bias, dtype, fast_accum=fa)
        hq, hs = _eager.quantize_fp8_cat(None, h, "swiglu")
        return _eager.fp8_linear_unchecked(hq, hs, _buf(block, f"{s.name}_fc2_w"), _buf(block, f"{s.name}_fc2_s"),
                                           ff.linear_out.bias, dtype, fast_accum=fa)
    mods = E.children(ff.net)
    h = _eager.fp8_linear_unchecked(q, qs, _buf(block, f"{s.name}_fc1_w"), _buf(block, f"{s.name}_fc1_s"), None,
                                    dtype, fast_accum=fa)
    hq, hs = _eager.quantize_fp8(h, mods[0].proj.bias, "gelu_tanh")
    return _eager.fp8_linear_unchecked(hq, hs, _buf(block, f"{s.name}_fc2_w"), _buf(block, f"{s.name}_fc2_s"),
                                       mods[2].bias, dtype, fast_accum=fa)


def _as_fp8(outs):
    """Look-ahead outputs left by the previous block: FP8 pairs as they are; model-dtype tensors
    (left by a block on the bf16 path) quantised here."""
    return [o if isinstance(o, tuple) else _eager.quantize_fp8(o) for o in outs]


def usable(block, st, h, e) -> bool:
    """The FP8 path for this call: the block is ready, the streams fit the dual ops, the attention
    module still has our processor and no hooks. Context parallelism runs it too (per-token GEMMs and
    quantisation on this rank's rows, the attention through ``engine.cp_attention``)."""
    attn = getattr(block, st.family.attn)
    proc = attn.processor
    return (h.shape[0] == e.shape[0] and h.shape[-1] == e.shape[-1] and h.dtype == e.dtype
            and isinstance(proc, DS.JointAttnProcessor) and E.no_hooks(attn) and E.no_global_hooks()
            and not st.mode_stock and ready(block, st, h))


def run_block(block, st, h, e, temb, rot, index):
    """The fused double-stream block with FP8 GEMMs: (h, e) -> (h, e) (image, text)."""
    fam = st.family
    si, stx = fam.streams
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, h.shape[1] + e.shape[1])
    compiling = torch.compiler.is_compiling()
    keys = (h, e, *temb, index) if isinstance(temb, tuple) else (h, e, temb, index)  # what look-ahead matches
    pre = st.take_prenorm(block, *keys) if not compiling and st.prenorm is not None else None
    img_mod, txt_mod = pre.mods if pre is not None else DS.modulation_params(block, st, temb)
    i = DS._chunks(img_mod, st.order)
    t = DS._chunks(txt_mod, st.order)
    dtype = h.dtype
    if pre is not None:
        (iq, isc), (tq, tsc) = _as_fp8(pre.outs)
    else:
        iq, isc, tq, tsc = _eager.dual_norm_scale_shift_fp8(h, i[0], i[1], index, E.get(block, si.norm1).eps, e, t[0],
                                                            t[1], None, E.get(block, stx.norm1).eps, fam.norm)
    attn = getattr(block, fam.attn)
    img_attn, txt_attn = _attention(block, st, attn, iq, isc, tq, tsc, tables, dtype)
    h, iq, isc, e, tq, tsc = _eager.dual_gate_residual_norm_scale_shift_fp8(
        h, img_attn, i[2], i[3], i[4], index, E.get(block, si.norm2).eps,
        e, txt_attn, t[2], t[3], t[4], None, E.get(block, stx.norm2).eps)
    fa = st.fp8.fast_accum
    img_y, txt_y = _mlp(block, si, iq, isc, dtype, fa), _mlp(block, stx, tq, tsc, dtype, fa)
    nxt = None
    if not compiling and st.lookahead and dtype != torch.float16:
        nxt = DS._lookahead_target(st, block, h)
        if nxt is not None and not usable(nxt, st, h, e):
            nxt = None
    if nxt is not None:
        # the final gated residual + the next block's norm1 + modulation, quantised, in one pass
        n_img_mod, n_txt_mod = DS.modulation_params(nxt, st, temb)
        n_i, n_t = DS._chunks(n_img_mod, st.order), DS._chunks(n_txt_mod, st.order)
        h, niq, nis, e, ntq, nts = _eager.dual_gate_residual_norm_scale_shift_fp8(
            h, img_y, i[5], n_i[0], n_i[1], index, E.get(nxt, si.norm1).eps,
            e, txt_y, t[5], n_t[0], n_t[1], None, E.get(nxt, stx.norm1).eps)
        keys = (h, e, *temb, index) if isinstance(temb, tuple) else (h, e, temb, index)
        st.prenorm = E.Prenorm(nxt, keys, (n_img_mod, n_txt_mod), ((niq, nis), (ntq, nts)))
    else:
        h = _eager.gate_residual(h, img_y, i[5], index)
        e = _eager.gate_residual(e, txt_y, t[5], None)
    if e.dtype == torch.float16:
        e = e.clip(-65504, 65504)
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h, e
