"""The integration engine: put a diffusers DiT on fused ops from a family description.

Nothing here names a model. A family module (listed in ``integrations.FAMILY_MODULES``) describes its model
with a :class:`Family`: which module lists hold the blocks and of what kind, where each stream's
modules are, the modulation source and chunk order, the norms, the QK norm, the RoPE tables, the
attention layout and mask, the MLP, the per-token parameter-set index, plus explicit hooks for what
a description cannot say (the block forward's signature, the stock block forward, a probe input).
The engine does the rest: pick the family by model class, check and patch the blocks (the block
kinds live in their own modules: ``double_stream``), pack weights, wrap the model forward (mask,
autograd, parallelism and dtype fallbacks, verify, the per-forward state), wrap the RoPE module
(tables once per forward), compose with hooks, report, unpatch. See docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .._validation import FusedDitInputError
from ..ops.linear import packed_rows

log = logging.getLogger(__name__)

OPS = ("modulation", "qk_norm_rope", "attention", "mlp")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# MLP kinds whose fused form exists on CUDA only (cuBLASLt's GELU epilogue); "swiglu" is an op of its own
MLP_CUDA_ONLY = ("gelu_tanh",)
ATTR = "_fused_dit_state"
# A/B switches of the benchmarks (not in patch's signature; see patch_ab)
SWITCHES = dict(pack_qkv=True, pack_mod=True, lookahead=True, dual_launch=True, qk_path="joint")


# --- family description ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Stream:
    """One token stream of a block: attribute paths (inside the block, or ``Family.attn``)."""
    name: str
    mod: str  # modulation module (Sequential(SiLU, Linear) for source "block_linear")
    norm1: str
    norm2: str
    mlp: str
    q: str
    k: str
    v: str
    q_norm: str
    k_norm: str
    out: str  # output projection (path inside the Attention module)
    # the modulation Linear (path inside the block) when ``mod`` is not Sequential(SiLU, Linear) but a
    # module that applies Linear(SiLU(temb)) and its norm (an adaLN-Zero module): None = f"{mod}.1"
    mod_linear: str = None

    def mod_lin(self) -> str:
        return self.mod_linear or f"{self.mod}.1"


@dataclass(frozen=True)
class Family:
    """What the engine needs to know about one model family (see docs/architecture.md)."""
    name: str
    model_classes: tuple  # class names (diffusers)
    block_lists: tuple  # ((attribute, kind), ...); kinds: "double" (double_stream.py), "single" (single_stream.py),
    # "self_cross" (self_cross.py)
    streams: tuple  # (image Stream, text Stream) of the double-stream blocks
    attn: str = "attn"  # the block's Attention module
    # modulation: "block_linear" (per-block Sequential(SiLU, Linear) on temb); "model_linear" (model-level
    # projections computed once per forward by the model, which hands every block the modulation
    # outputs: the block forward passes them to the block kind in place of temb); families to come add
    # "table_plus_temb" (learned table + temb)
    mod_source: str = "block_linear"
    mod_chunks: tuple = ("shift1", "scale1", "gate1", "shift2", "scale2", "gate2")
    norm: str = "layer"  # norm1/norm2 kind ("layer" | "rms"), not affine, fp32 compute, eps from the module
    qk_norm: str = "head"  # RMSNorm over head_dim ("head") or over all heads ("across_heads")
    rope_module: str = None  # path of the RoPE module: called once per model forward, output to every block
    rope_interleaved: bool = True
    rope_tables: Callable = None  # stock RoPE output -> (img_table, txt_table) fp32 cos|sin
    rope_stock: Callable = None  # tables -> what the stock processor takes
    rope_key: Callable = None  # (args, kwargs) -> cache key of the RoPE module's call, or None
    # the RoPE module's output covers the joint sequence [text, image] (one table, split per block at
    # the text length) instead of (image, text) tables; is_tables: tells the fused tables from the
    # stock output (None: engine.is_tables, real (not complex) tensors)
    rope_joint: bool = False
    is_tables: Callable = None
    # False: the model post-processes the RoPE module's output (e.g. calls it per stream and concatenates
    # the (cos, sin) halves), so the module keeps its stock output and the blocks convert it to tables
    # once per forward (cached on the identity of the tensors every block receives)
    rope_in_module: bool = True
    mask_kwarg: str = "encoder_hidden_states_mask"  # the model forward's text mask (None: it has none)
    mask_pos: int = 2  # its position in the model forward
    mlp: str = "gelu_tanh"  # diffusers FeedForward(activation_fn="gelu-approximate"); "swiglu": see mlp_act
    # () -> the activation module classes a "swiglu" MLP (linear_in, act_fn, linear_out) may hold for
    # the fused form (another activation: a module call)
    mlp_act: Callable = None
    index_flag: str = None  # block attribute: the block gets a per-token parameter-set index (2 sets)
    # double-stream streams clipped to +-65504 at the block's end in fp16, as the stock block does
    fp16_clip: tuple = ("image", "text")
    # (args, kwargs) of a model forward -> why it runs the stock forward (a mode the fused blocks do not
    # implement), or None
    forward_reason: Callable = None
    # single-stream blocks (kind "single"): paths inside the block, and the chunk order of its modulation
    single: "Single" = None
    # hooks
    block_forward: Callable = None  # the fused forward with the stock signature (bound per block)
    stock_block_forward: Callable = None  # (block) -> the class's forward
    processor_class: Callable = None  # the double-stream processor class (None: double_stream.JointAttnProcessor)
    # the fused forward of kind "single" blocks when they need their own (torch.compile keys its
    # cache on the code object: one function for two block classes would recompile); None: block_forward
    single_block_forward: Callable = None
    stock_processors: Callable = None  # () -> processor classes the fused processor replaces
    probe_call: Callable = None  # (model, block) -> (args, kwargs) of a tiny block call
    describe: Callable = None  # model -> extra "key=value" text for the report
    # self-attention + cross-attention blocks (kind "self_cross", self_cross.py): their description
    self_cross: object = None
    # (st, args, kwargs) -> output: the family's own eager fused model forward, for what calling the
    # stock forward cannot express (e.g. per-token timesteps collapsed to two parameter sets and a
    # per-token index); None: the stock forward, with the patched blocks
    model_forward: Callable = None

    def forward_for(self, kind):
        return self.single_block_forward if kind == "single" and self.single_block_forward else self.block_forward

    def tables_ok(self, rot) -> bool:
        return self.is_tables(rot) if self.is_tables is not None else is_tables(rot)

    def chunk_order(self):
        return tuple(self.mod_chunks.index(c) for c in
                     ("shift1", "scale1", "gate1", "shift2", "scale2", "gate2"))


@dataclass(frozen=True)
class Single:
    """A single-stream block (text and image concatenated, one set of weights; kind "single"): the
    attention's q/k/v and QK norms (paths inside ``attn``), the MLP input projection whose output
    goes through ``mlp_act`` (next to the attention, from the same normed input), and ``out`` over
    [attention | activated MLP] (no attention output projection)."""
    mod: str  # the adaLN module (Linear(SiLU(temb)) + its norm)
    mod_linear: str  # its Linear (3 chunks)
    norm: str  # its norm (path inside the block)
    q: str = "to_q"
    k: str = "to_k"
    v: str = "to_v"
    q_norm: str = "norm_q"
    k_norm: str = "norm_k"
    mlp_in: str = "proj_mlp"
    mlp_act: str = "gelu_tanh"  # "gelu_tanh" | "swiglu" (silu(first half) * second half of the MLP input)
    out: str = "proj_out"
    chunks: tuple = ("shift", "scale", "gate")
    # one Linear (path inside the block) whose rows are q | k | v | MLP input (the model's own fused
    # projection; then q, k, v and mlp_in are unused): None = separate Linears, packed at patch time
    qkv_mlp: str = None
    # the attention module computes the MLP and the output projection too (a module call returns the
    # block's update, not the attention output)
    attn_module_mlp: bool = False

    def chunk_order(self):
        return tuple(self.chunks.index(c) for c in ("shift", "scale", "gate"))


def _families():
    from . import FAMILY_MODULES
    return [importlib.import_module(f"{__package__}.{m}").FAMILY for m in FAMILY_MODULES]


def resolve(model_or_pipeline):
    """(model, family): the model itself or ``pipeline.transformer``, by class name."""
    fams = _families()
    m = model_or_pipeline
    for cand in (m, getattr(m, "transformer", None)):
        for fam in fams:
            if cand is not None and type(cand).__name__ in fam.model_classes:
                return cand, fam
    names = ", ".join(c for f in fams for c in f.model_classes)
    raise TypeError(f"fused_dit_ops.patch takes a diffusers model of a supported family ({names}) or a "
                    f"pipeline with one as .transformer, got {type(model_or_pipeline).__name__}")


def get(root, path: str):
    for name in path.split("."):
        root = root._modules.get(name) if root is not None else None
    return root


def blocks_of(model, family):
    """[(name, block, kind)] over the family's block lists."""
    return [(f"{attr}.{i}", b, kind) for attr, kind in family.block_lists
            for i, b in enumerate(getattr(model, attr))]


def _kind(kind):
    return importlib.import_module(f"{__package__}.{ {'double': 'double_stream', 'single': 'single_stream', 'self_cross': 'self_cross'}[kind]}")


def _precision(name):
    """The module of a lower-precision block path ("fp8": ``fp8.py``, a variant of the double-stream
    kind); like the block kinds, it builds on this module, which reaches it by name."""
    return importlib.import_module(f"{__package__}.{ {'fp8': 'fp8', 'fp8_attention': 'fp8_attention'}[name]}")


# --- report ----------------------------------------------------------------------------------------

@dataclass
class PatchReport:
    """What :func:`patch` did. ``swapped``: names of the pieces now on fused ops; ``stock``: name ->
    why it stays stock; ``verify``: {max_abs, rel_fro, ...} after the first call in verify mode;
    ``runtime``: calls that fell back to stock and why (updated live)."""
    model: str = ""
    options: dict = field(default_factory=dict)
    swapped: list = field(default_factory=list)
    stock: dict = field(default_factory=dict)
    verify: dict | None = None
    runtime: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused_dit_ops.patch: {self.model}",
                 "  options: " + ", ".join(f"{k}={v}" for k, v in self.options.items())]
        swapped = _summarise(self.swapped)
        lines.append(f"  swapped ({len(swapped)}):" + ("" if swapped else " none"))
        lines += [f"    {s}" for s in swapped]
        lines.append(f"  stock ({len(self.stock)}):" + ("" if self.stock else " none"))
        lines += [f"    {k}: {v}" for k, v in self.stock.items()]
        if self.verify is not None:
            lines.append("  verify: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.verify.items()))
        elif self.options.get("verify"):
            lines.append("  verify: pending (runs on the first forward)")
        if self.runtime:
            lines.append("  runtime fallbacks: " + ", ".join(f"{k}: {v}" for k, v in self.runtime.items()))
        return "\n".join(lines)

    __repr__ = __str__


def _fmt(v):
    return f"{v:.3e}" if isinstance(v, float) else str(v)


def _summarise(names):
    """'<list>.0' ... '<list>.59' collapsed into one line per block list."""
    out, lists = [], {}
    for n in names:
        head, _, idx = n.rpartition(".")
        if head and idx.isdigit() and "." not in head:
            lists.setdefault(head, []).append(int(idx))
        else:
            out.append(n)
    for head, idx in lists.items():
        out.append(f"{head}[{_ranges(sorted(idx))}] (block forward + attention processor)")
    return out


def _ranges(idx):
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


# --- shared state --------------------------------------------------------------------------------

class State:
    """One per patched model; blocks, processors and wrappers hold a reference."""

    def __init__(self, family, ops, switches, report, verify, reuse_mod=True):
        self.family = family
        self.order = family.chunk_order()
        self.modulation = "modulation" in ops
        self.qk = "qk_norm_rope" in ops
        self.attention = "attention" in ops
        self.mlp = "mlp" in ops
        self.qk_path = switches["qk_path"]
        self.dual_launch = switches["dual_launch"]  # image + text modulation ops in one launch (dual_* ops)
        self.reuse_mod = reuse_mod  # reuse the packed modulation GEMVs' outputs across forwards (equal temb)
        self.report = report
        self.verify_pending = verify
        self.mode_stock = False
        self.detached = False  # unpatched (what a hook still wraps runs stock)
        self.tables_from_rope = True  # False when some block stays stock: it needs the stock RoPE output
        self._tables_of = None  # (stock rope output, tables): converted once per forward
        self.tables: dict = {}
        self.orig_model_forward = None
        self.orig_rope_forward = None
        self.prev_forward: dict = {}  # id(module) -> instance-level forward it had before patching
        self.patched_blocks: list = []
        self.block_fn: dict = {}  # id(block) -> the fused forward function bound on it
        self.procs: list = []  # (attn module, original processor)
        self.inner_refs: list = []  # (block, diffusers HookFunctionReference, attribute, original forward)
        self.packed_qkv: dict = {}  # id(attn) -> (text, image) PackedLinears
        self.packed_mod: dict = {}  # id(block) -> PackedLinears of the streams' modulation Linears
        self._silu = None  # (temb, temb._version, silu(temb)): one SiLU per forward, not per block
        # weakref to the joint output of the last single-stream block: its two halves' base when the
        # views carry none (inference tensors, made under torch.inference_mode(), have no _base)
        self.last_joint = None
        self.next_block: dict = {}  # id(block) -> the patched block that follows it in the model
        self.lookahead = False  # True inside an eager patched model forward (with look-ahead pairs)
        self.prenorm = None  # Prenorm left by the previous block for the next one
        self.in_forward = False  # True inside an eager patched model forward
        self.mod_cache: dict = {}  # id(block) -> (packed GEMV output, its weight/bias versions)
        self.mod_cache_temb = None  # the temb (a copy) those outputs were computed from
        self._mod_hit = None  # (temb, temb._version, hit) decided once per forward
        self.forwards = 0  # eager fused model forwards so far (see PackedLinears.get)
        self.fp8 = None  # precision="fp8": fp8.Fp8State
        self.attn_fp8 = None  # attention_precision="fp8": fp8_attention.Fp8AttentionState
        self.token_index = None  # per-token parameter-set index of this forward (Family.model_forward)
        self.cp = False  # diffusers' context parallelism on in this forward (see _note_cp)
        self.model = None  # the patched model

    @contextlib.contextmanager
    def stock(self):
        old, self.mode_stock = self.mode_stock, True
        try:
            yield
        finally:
            self.mode_stock = old

    def count(self, why):
        self.report.runtime[why] = self.report.runtime.get(why, 0) + 1

    def rope_tables(self, rot):
        """Real cos|sin tables for the fused ops; the stock RoPE output (what the blocks get when
        some block stays stock, or a block called alone) is converted once per forward, cached on
        the identity of its tensors (eager, not while capturing a CUDA graph)."""
        if self.family.tables_ok(rot) or torch.compiler.is_compiling():
            return self.family.rope_tables(rot)
        c = self._tables_of
        if c is not None and len(c[0]) == len(rot) and all(a is b for a, b in zip(c[0], rot)):
            return c[1]
        tables = self.family.rope_tables(rot)
        if not (rot[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            self._tables_of = (tuple(rot), tables)
        return tables

    def take_prenorm(self, block, *inputs):
        """The norm1 outputs the previous block computed for this block, if they are for these very
        inputs (same objects, not modified in place since); else None."""
        pre, self.prenorm = self.prenorm, None
        if pre is None:
            return None
        if pre.block is block and pre.inputs_match(*inputs):
            return pre
        self.count("look-ahead norm1 unused (block inputs changed between blocks)")
        return None

    def silu(self, temb):
        """silu(temb), once per forward (every block gets the same ``temb``: cached on identity and
        the version counter); eager only."""
        c = self._silu
        if c is not None and c[0] is temb and c[1] == version_of(temb):
            return c[2]
        out = F.silu(temb)
        self._silu = (temb, version_of(temb), out)
        return out

    def _reuse_decision(self, temb) -> bool:
        """Does ``temb`` equal the temb of the cached modulation outputs? Once per forward, one
        device sync; never while a CUDA graph is captured. A miss restarts the cache for this temb."""
        d = self._mod_hit
        if d is not None and d[0] is temb and d[1] == version_of(temb):
            return d[2]
        if temb.is_cuda and torch.cuda.is_current_stream_capturing():
            self._mod_hit = (temb, version_of(temb), False)
            return False
        c = self.mod_cache_temb
        hit = (c is not None and c.shape == temb.shape and c.dtype == temb.dtype and c.device == temb.device
               and torch.equal(c, temb))
        if not hit:
            self.mod_cache.clear()
            self.mod_cache_temb = temb.detach().clone()
        self._mod_hit = (temb, version_of(temb), hit)
        return hit

    def cached_mod(self, block, pk, temb):
        """The packed modulation GEMV output of ``block`` for this temb from an earlier forward (CFG:
        cond and uncond share the timestep); None when it must be computed."""
        if not (self.in_forward and self.reuse_mod) or torch.compiler.is_compiling():
            return None
        if not self._reuse_decision(temb):
            return None
        e = self.mod_cache.get(id(block))
        if e is None or e[1] != pk.versions():
            return None
        return e[0]

    def store_mod(self, block, pk, temb, out):
        d = self._mod_hit
        if (self.in_forward and self.reuse_mod and d is not None and d[0] is temb
                and not torch.compiler.is_compiling()):
            self.mod_cache[id(block)] = (out, pk.versions())

    def clear_mod_cache(self):
        self.mod_cache.clear()
        self.mod_cache_temb = None
        self._mod_hit = None


def state_of(module) -> State:
    return module.__dict__[ATTR]


def version_of(t) -> int:
    """``t._version``, or -1 for an inference tensor (made under ``torch.inference_mode()``: it has no
    version counter, and outside inference mode it cannot be written in place): the caches then go by
    identity alone."""
    return -1 if t.is_inference() else t._version


class Prenorm:
    """What block i leaves for block i+1 when it ends with ``gate_residual_norm_scale_shift`` fused
    with block i+1's norm1 + modulation: block i+1's modulation params and modulated inputs, and the
    exact tensors (with version counters) they were made from."""
    __slots__ = ("block", "refs", "mods", "outs")

    def __init__(self, block, inputs, mods, outs):
        self.block = block
        self.refs = tuple((t, version_of(t) if t is not None else 0) for t in inputs)
        self.mods, self.outs = mods, outs

    def inputs_match(self, *ts) -> bool:
        return all(t is r and (t is None or version_of(t) == v) for t, (r, v) in zip(ts, self.refs))


def is_tables(rot) -> bool:
    return rot is not None and not torch.is_complex(rot[0])


# --- hooks and plain modules ------------------------------------------------------------------------

def no_hooks(*mods) -> bool:
    """No torch forward (pre-)hooks and no instance-level ``forward`` (how diffusers' HookRegistry and
    accelerate hooks wrap a module)."""
    for m in mods:  # a loop, not any(<genexpr>): on the eager host path
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return False
    return True


def cp_hooks_only(m) -> bool:
    """No hooks on ``m`` but diffusers' context-parallel split/gather hooks (``enable_parallelism``),
    which a module call runs."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if "forward" not in m.__dict__:
        return True
    reg = getattr(m, "_diffusers_hook", None)
    hooks = getattr(reg, "hooks", None)
    return bool(hooks) and all(type(h).__name__ in ("ContextParallelSplitHook", "ContextParallelGatherHook")
                               for h in hooks.values()) and len(getattr(reg, "_fn_refs", ())) == len(hooks)


def no_global_hooks() -> bool:
    """No forward (pre-)hooks registered for every module: a module not called through ``__call__``
    must not have any to skip."""
    mm = torch.nn.modules.module
    return not (mm._global_forward_hooks or mm._global_forward_pre_hooks)


def plain_linear(m) -> bool:
    """A bare ``nn.Linear`` without hooks and with plain dense parameters: its output is exactly
    x @ W.T + b, so its parameters may be used directly (packed GEMM, GEMM epilogue). Anything else
    (a LoRA wrapper, a hooked Linear, a tensor-subclass weight: torchao, DTensor) is called as a module."""
    if type(m) is not torch.nn.Linear or not no_hooks(m):
        return False
    ps = m._parameters  # skips Module.__getattr__; a tensor-subclass parameter is not an nn.Parameter
    b = ps.get("bias")
    return type(ps.get("weight")) is torch.nn.Parameter and (b is None or type(b) is torch.nn.Parameter)


def call_linear(lin, x):
    """``lin(x)``; a bare Linear without hooks as ``F.linear`` (minus ``Module.__call__``)."""
    if plain_linear(lin) and no_global_hooks():
        return F.linear(x, lin.weight, lin.bias)
    return lin(x)


def children(m) -> list:
    return list(m._modules.values())


def skippable_dropout(m) -> bool:
    """An ``nn.Dropout`` that is the identity here (eval mode or p == 0) and has no hooks."""
    return type(m) is torch.nn.Dropout and (not m.training or m.p == 0) and no_hooks(m)


class PackedLinears:
    """Same-shape Linear weights packed into one [k*n, in] matrix (and [k*n] bias) so that k
    projections of one input run as one GEMM: a stream's q/k/v, or a block's per-stream modulation
    Linears (GEMVs over ~113 MB of weights each at D = 3072).

    The modules keep their Parameters; each parameter's ``.data`` becomes a row view of one packed
    storage (no second copy), so ``load_state_dict`` and in-place edits write through. :meth:`get`
    rebuilds the packed view on every use after checking that the modules at the recorded paths
    are still these bare Linears and their weights still consecutive rows of one storage: a module
    replaced or wrapped after patching (LoRA, a hook, quantization) is called as a module; parameters
    replaced (``model.to``, an offloading hook) are re-packed at the next eager use (not while a CUDA
    graph is captured or torch.compile traces), and nothing keeps the old storage alive."""

    def __init__(self, root, paths, mixed=False):
        self.root = root
        self.paths = tuple(paths)
        self.mixed = mixed  # Linears of different output sizes (same input size)
        self.lins = self._modules_now()
        self.n = self.lins[0].weight.shape[0]
        self.repacked_at = None  # st.forwards at the last re-pack
        self.volatile = False  # parameters replaced in consecutive forwards: never re-pack again
        self._pack()

    def _modules_now(self):
        return [get(self.root, p) for p in self.paths]

    @staticmethod
    def packable(lins, mixed=False) -> bool:
        if not all(plain_linear(l_) for l_ in lins):
            return False
        w0 = lins[0].weight
        has_b = lins[0].bias is not None
        return (all((l_.weight.shape[1:] == w0.shape[1:] if mixed else l_.weight.shape == w0.shape)
                    and l_.weight.dtype == w0.dtype
                    and l_.weight.device == w0.device for l_ in lins)
                and all((l_.bias is not None) == has_b for l_ in lins)
                and all(l_.bias is None or (l_.bias.dtype == w0.dtype and l_.bias.device == w0.device)
                        for l_ in lins))

    @torch.no_grad()
    def _pack(self):
        weight = torch.cat([l_.weight.detach() for l_ in self.lins], 0)
        bias = (torch.cat([l_.bias.detach() for l_ in self.lins], 0) if self.lins[0].bias is not None
                else None)
        for l_ in self.lins:
            for t in (l_.weight, l_.bias):
                # the old storage is freed below while the copies above may still read it on this
                # stream; it may come from another stream (group offloading onloads on a side stream)
                if t is not None and t.is_cuda:
                    t.data.record_stream(torch.cuda.current_stream(t.device))
        r = 0
        for l_ in self.lins:
            n = l_.weight.shape[0]
            l_.weight.data = weight[r:r + n]
            if bias is not None:
                l_.bias.data = bias[r:r + n]
            r += n

    def same_modules(self) -> bool:
        lins = self._modules_now()
        return all(a is b for a, b in zip(lins, self.lins)) and all(plain_linear(l_) for l_ in lins)

    def packed(self):
        """(weight [k*n, in], bias [k*n] or None) as views of the shared storage, or None."""
        if not self.same_modules():
            return None
        params = [l_._parameters for l_ in self.lins]
        rows = _mixed_rows if self.mixed else packed_rows
        w = rows([p["weight"] for p in params])
        if w is None:
            return None
        if params[0]["bias"] is None:
            return w, None
        b = rows([p["bias"] for p in params])
        return None if b is None else (w, b)

    def get(self, st, what):
        """:meth:`packed`, re-packing first when only the parameters were replaced (eager, outside
        CUDA-graph capture); None means: call the modules. Counted in ``report.runtime``."""
        wb = self.packed()
        if wb is not None:
            return wb
        if (self.same_modules() and self.packable(self.lins, self.mixed) and not torch.compiler.is_compiling()
                and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
            if self.repacked_at is not None and st.forwards - self.repacked_at <= 1:
                # replaced again one forward later (an offloading hook): each re-pack would copy the
                # weights once more, more than packing saves
                self.volatile = True
            if self.volatile:
                st.count(f"{what} not re-packed (parameters replaced on consecutive forwards, e.g. by an "
                         "offloading hook): module calls")
                return None
            self._pack()
            self.repacked_at = st.forwards
            st.clear_mod_cache()  # outputs of the old parameters are stale
            wb = self.packed()
            if wb is not None:
                st.count(f"{what} re-packed (parameters were replaced, e.g. by model.to)")
                return wb
        st.count(f"{what} not packed now (modules replaced, wrapped or hooked, e.g. a LoRA adapter): "
                 "module calls")
        return None

    def versions(self) -> tuple:
        """Identities and version counters of the parameters (in-place writes bump the counters,
        replaced parameters change the identities; writes through ``.data`` change neither)."""
        return tuple((id(l_.weight), version_of(l_.weight), id(l_.bias), version_of(l_.bias) if l_.bias is not None else 0)
                     for l_ in self.lins)

    @torch.no_grad()
    def unpack(self):
        """Give each parameter its own storage back (values unchanged) where they still share one."""
        for ps in ([l_.weight for l_ in self.lins], [l_.bias for l_ in self.lins]):
            if ps[0] is not None and (_mixed_rows if self.mixed else packed_rows)(ps) is not None:
                for p in ps:
                    p.data = p.data.clone()


def _mixed_rows(ts):
    """The [sum n_j, ...] view covering ``ts`` if they are consecutive contiguous row blocks of one
    storage (any row counts, same trailing shape and dtype), else None. Metadata only."""
    t0 = ts[0]
    p, es = t0.data_ptr(), t0.element_size()
    for t in ts:
        if (t is None or t.data_ptr() != p or not t.is_contiguous() or t.shape[1:] != t0.shape[1:]
                or t.dtype != t0.dtype):
            return None
        p += t.numel() * es
    st = t0.untyped_storage()
    if p > st.data_ptr() + st.nbytes():
        return None
    rows = sum(t.shape[0] for t in ts)
    return t0.detach().as_strided((rows,) + tuple(t0.shape[1:]), t0.stride(), t0.storage_offset())


# --- model-level wrappers --------------------------------------------------------------------------

def _rope_forward(self, *args, **kwargs):
    """Stock mode: the stock output. Fused: fp32 cos|sin tables, cached per call key (eager)."""
    st = state_of(self)
    fam = st.family
    if st.mode_stock or not st.tables_from_rope or st.cp:
        # under context parallelism diffusers' hooks may shard the RoPE output (split_output): they
        # expect the stock format; the blocks convert each rank's shard once per forward
        return st.orig_rope_forward(*args, **kwargs)
    key = None if torch.compiler.is_compiling() or fam.rope_key is None else fam.rope_key(args, kwargs)
    if key is None:
        return fam.rope_tables(st.orig_rope_forward(*args, **kwargs))
    hit = st.tables.get(key)
    if hit is None:
        hit = fam.rope_tables(st.orig_rope_forward(*args, **kwargs))
        if len(st.tables) >= 16:
            st.tables.clear()
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            st.tables[key] = hit
    return hit


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _model_forward(self, *args, **kwargs):
    st = state_of(self)
    fam = st.family
    if st.mode_stock:
        return st.orig_model_forward(*args, **kwargs)
    _note_cp(st, self)
    if torch.compiler.is_compiling():
        return st.orig_model_forward(*args, **kwargs)
    mask = None if fam.mask_kwarg is None else kwargs[fam.mask_kwarg] if fam.mask_kwarg in kwargs else (
        args[fam.mask_pos] if len(args) > fam.mask_pos else None)
    why = None
    if mask is not None:
        if bool(mask.all()):  # no padding: same math without the mask
            if fam.mask_kwarg in kwargs:
                kwargs = dict(kwargs, **{fam.mask_kwarg: None})
            else:
                args = args[:fam.mask_pos] + (None,) + args[fam.mask_pos + 1:]
        else:
            why = "text mask with padding (stock forward)"
    why = why or _parallel_reason(self, fam, after_patch=True)
    if not why and fam.forward_reason is not None:
        why = fam.forward_reason(args, kwargs)
    # the activations' dtype decides (weights may be stored in another, e.g. fp8 layerwise casting)
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not why and isinstance(x, torch.Tensor) and x.dtype not in DTYPES:
        why = (f"activations in {str(x.dtype).replace('torch.', '')} (e.g. the model moved after patching; "
               "fused ops take fp32/bf16/fp16): stock forward")
    if not why and _needs_autograd(self, args, kwargs):
        # the fused ops are inference-only (no backward): gradients need the stock forward
        why = ("autograd: grad mode on and parameters or inputs require grad (stock forward; "
               "run inference under torch.no_grad() or torch.inference_mode())")
    if why:
        st.count(why)
        _fp8_stock_check(st, why)
        with st.stock():
            return st.orig_model_forward(*args, **kwargs)
    if st.verify_pending:
        st.verify_pending = False
        _fp8_stock_check(st, "verify")
        with torch.no_grad():
            with st.stock():
                ref = _first_tensor(st.orig_model_forward(*args, **kwargs))
            out = _fused_model_forward(st, args, kwargs)  # the path every later forward takes
        st.report.verify = verify_stats(_first_tensor(out), ref)
        log.warning("fused_dit_ops.patch verify: %s", st.report.verify)
        return out
    return _fused_model_forward(st, args, kwargs)


def _fp8_stock_check(st, why):
    if st.fp8 is not None:
        no = st.fp8.stock_unavailable(st)
        if no:
            raise RuntimeError(f"fused_dit_ops: the stock forward is needed ({why}), but {no}")


def _needs_autograd(model, args, kwargs) -> bool:
    if not torch.is_grad_enabled():
        return False
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return True
    return any(p.requires_grad for p in model.parameters())


def _fused_model_forward(st: State, args, kwargs):
    """An eager fused model forward, with its per-forward state (look-ahead, modulation reuse)."""
    st.in_forward, st.lookahead, st.prenorm = True, bool(st.next_block), None
    st.forwards += 1
    try:
        if st.family.model_forward is not None:
            return st.family.model_forward(st, args, kwargs)
        return st.orig_model_forward(*args, **kwargs)
    finally:
        # never hold a block's activations past the forward; the modulation cache (small) stays
        st.in_forward, st.lookahead, st.prenorm, st._mod_hit = False, False, None, None
        st.token_index = None


def verify_stats(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.double(), ref.double()
    d = o - r
    return {"max_abs": d.abs().max().item(), "rel_fro": (d.norm() / r.norm().clamp_min(1e-30)).item(),
            "ref_max_abs": r.abs().max().item(), "finite": bool(torch.isfinite(o).all().item()),
            "dtype": str(out.dtype).replace("torch.", "")}


def _parallel_reason(model, fam, after_patch=False):
    """Why diffusers' parallelism rules out the fused blocks, or None. Context parallelism (Ulysses,
    ring) runs fused: the per-token ops on each rank's shard, the attention through diffusers'
    ``dispatch_attention_fn`` with the processor's ``parallel_config`` (see :func:`cp_attention`).
    Tensor parallelism (sharded Linears) is not taken: stock forward."""
    sfx = " after patch (stock forward)" if after_patch else ": stock forward"
    pc = getattr(model, "_parallel_config", None)
    if getattr(pc, "tensor_parallel_config", None) is not None:
        return "diffusers tensor parallelism is enabled on the model (sharded Linears)" + sfx
    return None


def cp_config(proc):
    """The diffusers ``ParallelConfig`` with context parallelism that ``enable_parallelism`` set on an
    attention processor, or None."""
    pc = getattr(proc, "_parallel_config", None)
    return pc if getattr(pc, "context_parallel_config", None) is not None else None


def cp_attention(q, k, v, proc):
    """Attention of this rank's q, k, v [B, S_local, H, D] under diffusers' context parallelism, or
    None without it. diffusers' ``dispatch_attention_fn`` runs the Ulysses all-to-all / ring on the
    processor's ``parallel_config`` with the processor's backend (``set_attention_backend``), else
    diffusers' active backend (``native``: SDPA): ``fused_dit.attention`` is not a diffusers backend,
    so its backends are not used here. No mask (the fused blocks take none)."""
    pc = cp_config(proc)
    if pc is None:
        return None
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 backend=getattr(proc, "_attention_backend", None), parallel_config=pc)


def cp_check_rows(st, tables, tokens):
    """Under context parallelism: the RoPE rows a block got are exactly its ``tokens`` (this rank's
    shard). The fused ops take tables with more rows than tokens (row l for token l), so a table the
    plan did not shard would be read silently; the stock model fails there too, with a shape error."""
    if not st.cp:
        return
    rows = sum(t.shape[0] for t in tables) if isinstance(tables, (tuple, list)) else tables.shape[0]
    if rows != tokens:
        raise ValueError(f"context parallelism: the RoPE output has {rows} rows for this rank's {tokens} tokens "
                         "(the model's _cp_plan did not shard it the way it shards the tokens, e.g. position "
                         "ids of a shape the plan does not split)")


def cp_backend_name(proc) -> str:
    """The diffusers attention backend :func:`cp_attention` runs for this processor."""
    b = getattr(proc, "_attention_backend", None)
    if b is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        b = _AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(b, "value", b))


def _note_cp(st, model):
    """Once per forward: context parallelism on or off (the RoPE wrapper then keeps the stock output,
    which diffusers' split hooks shard; the blocks convert it), and a report line."""
    fam = st.family
    blocks = getattr(model, fam.block_lists[0][0])
    proc = getattr(getattr(blocks[0], fam.attn, None), "processor", None) if len(blocks) else None
    pc = cp_config(proc)
    st.cp = pc is not None
    if pc is not None and not torch.compiler.is_compiling():
        c = pc.context_parallel_config
        line = (f"context parallelism (ulysses_degree={c.ulysses_degree}, ring_degree={c.ring_degree}): fused "
                 f"per-token ops on each rank's shard, attention through diffusers' dispatch_attention_fn "
                 f"(backend {cp_backend_name(getattr(proc, 'stock', proc))})")
        if line not in st.report.swapped:
            st.report.swapped.append(line)


# --- patch / unpatch -------------------------------------------------------------------------------

def _parse_ops(ops):
    if ops in (None, "all"):
        return set(OPS)
    if isinstance(ops, str):
        ops = [o.strip() for o in ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"unknown ops {bad}; choose from {OPS} or 'all'")
    return set(ops)


def hooked_inner_ref(block, fam):
    """(HookFunctionReference, attribute) through which diffusers' hooks on ``block`` (FirstBlockCache,
    block-level group offloading) call the block's own ``forward``, or None. The fused forward goes
    there, under the hooks, which keep running first."""
    reg = getattr(block, "_diffusers_hook", None)
    refs = getattr(reg, "_fn_refs", None)
    if not refs or block.__dict__.get("forward") is None:
        return None
    ref = refs[0]
    attr = "original_forward" if getattr(ref, "original_forward", None) is not None else "forward"
    f = getattr(ref, attr, None)
    if getattr(f, "__func__", None) is fam.stock_block_forward(block) and getattr(f, "__self__", None) is block:
        return ref, attr
    return None


def shared_block_reason(block, fam, kind):
    """The checks every block kind makes (None: they pass): ``forward`` not wrapped on the instance
    by anything but diffusers' hooks around the block's own forward, and the family's stock attention
    processor. ``kind``: the block kind, as :meth:`Family.forward_for` takes it."""
    fwd = block.__dict__.get("forward")
    if (fwd is not None and getattr(fwd, "__func__", None) is not fam.forward_for(kind)
            and hooked_inner_ref(block, fam) is None):
        return ("forward is wrapped on the instance by something other than diffusers' hooks around the "
                "block's own forward (e.g. an accelerate hook): patch before adding it")
    proc = getattr(getattr(block, fam.attn, None), "processor", None)
    if type(proc) not in fam.stock_processors():
        return (f"attention processor is {type(proc).__name__}, not "
                + " or ".join(c.__name__ for c in fam.stock_processors()))
    return None

def is_patched(model_or_pipeline) -> bool:
    try:
        model, _ = resolve(model_or_pipeline)
    except TypeError:
        return False
    st = model.__dict__.get(ATTR)
    return st is not None and not st.detached


def patch(model_or_pipeline, ops="all", attention_backend: str | None = None, verify: bool = False,
          reuse_mod: bool = True, probe: bool = True, precision: str = "bf16",
          keep_bf16_weights: bool = False, attention_precision: str = "bf16",
          fp8_fast_accum: bool | None = None) -> PatchReport:
    """Put every block of a supported diffusers transformer (or ``pipeline.transformer``) on fused
    ops, in place, per instance. Returns a :class:`PatchReport`. Patching twice re-patches.

    ``ops``: "all" or a subset of ("modulation", "qk_norm_rope", "attention", "mlp") (list or comma
    string); pieces left out run the stock code ("mlp": GELU-tanh in the fc1 GEMM's epilogue, CUDA,
    with "modulation"). ``attention_backend``: None (automatic) or a ``fused_dit.attention`` backend
    (fa3, fa4, cudnn, fa2, efficient, math). ``verify``: the first forward runs stock and fused on
    the same inputs and fills ``report.verify`` (max_abs, rel_fro). ``reuse_mod`` (eager model
    forwards): keep every block's modulation GEMV output and reuse it in the next forward whose temb
    is equal (CFG's cond and uncond forwards share the timestep), checked with one device sync per
    forward and against the parameters' version counters (writes through ``.data`` are not seen:
    re-patch after those). ``probe``: run the fused block once on a tiny input at patch time; a
    ``FusedDitInputError`` leaves the model stock with the reason. ``precision``: "bf16" (the model's
    dtype) or "fp8": the blocks' q/k/v, output projection and MLP Linears as FP8 e4m3 GEMMs with
    row-wise scales (CUDA compute capability 8.9+, bfloat16 model; see
    ``fused_dit_ops.integrations.fp8`` and ``fp8_kinds``); their bf16 weights wait on the CPU (pinned)
    while patched unless ``keep_bf16_weights``. ``attention_precision``: "bf16" (the model's dtype) or
    "fp8": the double-stream blocks' joint attention on e4m3 q, k, v (FlashAttention-3's FP8 forward on
    CUDA, sm90, bfloat16 model; the CPU runs the reference; see
    ``fused_dit_ops.integrations.fp8_attention``), with either ``precision``. ``fp8_fast_accum`` (with
    ``precision="fp8"`` only; None: True with ``precision="fp8"``): the FP8 GEMMs with fast accumulation
    (``torch._scaled_mm``'s ``use_fast_accum``, torchao's default: on Hopper the tensor-core partial sums
    are not promoted to fp32 at intervals; faster, slightly less accurate); False: promoted partial
    sums. The CPU reference accumulates in fp32 either way. :func:`unpatch` undoes it."""
    return patch_ab(model_or_pipeline, ops=ops, attention_backend=attention_backend, verify=verify,
                    reuse_mod=reuse_mod, probe=probe, precision=precision, keep_bf16_weights=keep_bf16_weights,
                    attention_precision=attention_precision, fp8_fast_accum=fp8_fast_accum)


def patch_ab(model_or_pipeline, ops="all", attention_backend=None, verify=False, reuse_mod=True, probe=True,
             precision="bf16", keep_bf16_weights=False, attention_precision="bf16", fp8_fast_accum=None,
             **switches) -> PatchReport:
    """:func:`patch` plus the benchmarks' A/B switches (not public API): ``pack_qkv`` (one q/k/v
    GEMM per stream over packed weights), ``pack_mod`` (one modulation GEMV per block),
    ``lookahead`` (a block's end fused with the next block's norm1), ``dual_launch`` (both streams'
    norm ops in one launch), ``qk_path`` ("joint": projections into one joint buffer; "cat":
    projections as modules, then ``qk_norm_rope_cat``). All on / "joint" by default."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if attention_precision not in ("bf16", "fp8"):
        raise ValueError(f"attention_precision must be 'bf16' or 'fp8', got {attention_precision!r}")
    if fp8_fast_accum is not None and not isinstance(fp8_fast_accum, bool):
        raise ValueError(f"fp8_fast_accum must be True, False or None, got {fp8_fast_accum!r}")
    if fp8_fast_accum is not None and precision != "fp8":
        raise ValueError(f"fp8_fast_accum={fp8_fast_accum} applies to the FP8 GEMMs and needs precision='fp8', got "
                         f"precision={precision!r}")
    if fp8_fast_accum is None:
        fp8_fast_accum = precision == "fp8"  # measured: same accuracy as torchao's per-row recipe, faster
    bad = set(switches) - set(SWITCHES)
    if bad:
        raise TypeError(f"unknown patch options {sorted(bad)}")
    sw = dict(SWITCHES, **switches)
    if sw["qk_path"] == "auto":
        sw["qk_path"] = "joint"
    if sw["qk_path"] not in ("joint", "cat"):
        raise ValueError(f"qk_path must be 'joint' or 'cat', got {sw['qk_path']!r}")
    model, fam = resolve(model_or_pipeline)
    if is_patched(model):
        unpatch(model)
    ops_set = _parse_ops(ops)
    p = next(model.parameters())
    dev = _execution_device(model)
    where = f"device={dev}" if dev == p.device else f"device={dev}, parameters on {p.device} (offloaded)"
    blocks = blocks_of(model, fam)
    extra = fam.describe(model) if fam.describe else ""
    report = PatchReport(model=f"{type(model).__name__}(layers={len(blocks)}, {extra}"
                               f"dtype={str(p.dtype).replace('torch.', '')}, {where})",
                         options=dict(ops=",".join(o for o in OPS if o in ops_set) or "none",
                                      attention_backend=attention_backend or "auto", verify=verify,
                                      reuse_mod=reuse_mod,
                                      **({"precision": precision} if precision != "bf16" else {}),
                                      **({"attention_precision": attention_precision}
                                         if attention_precision != "bf16" else {}),
                                      **({"fp8_fast_accum": fp8_fast_accum} if precision == "fp8" else {}),
                                      **{k: v for k, v in sw.items() if v != SWITCHES[k]}))
    if p.dtype not in DTYPES:
        report.stock["model"] = f"dtype {p.dtype} not supported (fp32, bf16, fp16)"
        return report
    if not ops_set:
        report.stock["model"] = "ops=[] selects no fused op"
        return report
    why = _parallel_reason(model, fam)
    if why:
        report.stock["model"] = why
        return report
    ok = []
    for name, block, kind in blocks:
        why = _kind(kind).block_reason(block, fam)
        if why:
            report.stock[name] = why
        else:
            ok.append((name, block, kind))
    if not ok:
        return report
    st = State(fam, ops_set, sw, report, verify, reuse_mod)
    st.model = model
    if "modulation" in ops_set and not sw["dual_launch"]:
        report.stock["dual_launch"] = "dual_launch=False: one launch per stream for each norm op"
    for name, block, kind in ok:
        block.__dict__[ATTR] = st
        inner = hooked_inner_ref(block, fam)
        st.block_fn[id(block)] = fam.forward_for(kind)
        fused = types.MethodType(st.block_fn[id(block)], block)
        if inner is not None:  # diffusers hooks stay on top; the fused forward goes under them
            ref, attr = inner
            st.inner_refs.append((block, ref, attr, getattr(ref, attr)))
            setattr(ref, attr, fused)
        else:
            block.forward = fused
        st.patched_blocks.append(block)
        report.swapped.append(name)
    for kind in dict.fromkeys(k for _, _, k in ok):
        _kind(kind).patch_blocks(st, [b for _, b, k in ok if k == kind], model, sw, attention_backend)
    # the GEMMs' dtype is the block Linears' (a model may keep its first parameters, tables, in fp32)
    gemm_dtype = next((m.weight.dtype for _, b, _ in ok for m in b.modules() if isinstance(m, torch.nn.Linear)),
                      p.dtype)
    if precision == "fp8":
        _precision("fp8").patch_blocks(st, [b for _, b, k in ok if k == "double"], report, dev, gemm_dtype,
                                       keep_bf16_weights or verify,
                                       {kind: [b for _, b, k in ok if k == kind] for kind in ("single", "self_cross")},
                                       fast_accum=fp8_fast_accum)
    if attention_precision == "fp8":
        _precision("fp8_attention").patch_blocks(st, {kind: [b for _, b, k in ok if k == kind]
                                                      for kind in ("double", "single", "self_cross")}, report, dev,
                                                 gemm_dtype,
                                                 attention_backend)
    rope = get(model, fam.rope_module)
    for m in (model, rope):  # e.g. accelerate's cpu-offload hook on the model: kept, called
        prev = m.__dict__.get("forward")
        if prev is not None and getattr(prev, "__func__", None) not in (_model_forward, _rope_forward):
            st.prev_forward[id(m)] = prev
    st.orig_rope_forward = rope.forward
    rope.__dict__[ATTR] = st
    rope.forward = types.MethodType(_rope_forward, rope)
    st.orig_model_forward = model.forward
    model.__dict__[ATTR] = st
    model.forward = types.MethodType(_model_forward, model)
    if st.inner_refs:
        report.swapped.append(f"{len(st.inner_refs)} blocks with diffusers hooks added before patch: the fused "
                              "forward runs under the hooks (no look-ahead into them)")
    if len(blocks) != len(ok):
        # stock blocks need the stock RoPE output: the patched blocks convert it once per forward
        st.tables_from_rope = False
        report.stock[fam.rope_module] = ("some blocks stay stock and need the stock RoPE output: the fused "
                                         "blocks convert it to tables once per forward")
    elif not fam.rope_in_module:
        st.tables_from_rope = False
        report.swapped.insert(0, f"{fam.rope_module} output (stock) converted to cos|sin tables once per forward "
                                 "by the first fused block")
    else:
        report.swapped.insert(0, f"{fam.rope_module} (RoPE tables once per forward"
                                 + (", cached per shape)" if fam.rope_key is not None else ")"))
    report.swapped.insert(0, "forward (text-mask check, verify)")
    for op, what in (("modulation", "stock norms + modulation + residual"),
                     ("qk_norm_rope", "stock RMSNorm, torch RoPE, torch.cat"),
                     ("attention", "diffusers dispatch_attention_fn")):
        if op not in ops_set:
            report.stock[op] = f"not selected in ops ({what})"
    if "mlp" not in ops_set or "modulation" not in ops_set:
        report.stock["mlp"] = ("not selected in ops (stock FeedForward)" if "mlp" not in ops_set
                               else "needs 'modulation' (stock FeedForward)")
    elif fam.mlp in MLP_CUDA_ONLY and (dev is None or dev.type != "cuda"):
        report.stock["mlp"] = (f"GELU epilogue is CUDA-only: stock FeedForward while the model runs on {dev} "
                               "(the epilogue applies once it runs on CUDA)")
    if probe:
        _run_probe(model, fam, ok[0][1], dev, report)
    return report


def _run_probe(model, fam, blk, dev, report):
    devs = {t.device for t in blk.parameters()}
    if dev is None or devs != {dev}:
        # offloaded: hooks around the model or its modules move the weights in; a block call skips them
        report.stock["probe"] = (f"skipped: the block's parameters are on {sorted(map(str, devs))}, the "
                                 f"model computes on {dev} (offloading hooks move them)")
        return
    try:
        why = _probe(model, blk)
    except BaseException:
        unpatch(model)  # never leave a half-patched model behind an exception
        raise
    if dev.type != "cuda" and torch.cuda.is_available():
        report.stock["probe"] = (f"ran on {dev} (the reference implementations): patch after moving the "
                                 "model to the GPU to probe the CUDA kernels")
    if why:
        unpatch(model)
        report.swapped.clear()
        report.stock["model"] = f"probe of the fused block failed: {why}"


@torch.no_grad()
def _probe(model, block):
    """Run the fused block forward (not through its hooks) on the family's tiny probe input; the
    error text or None."""
    fam = state_of(block).family
    args, kwargs = fam.probe_call(model, block)
    try:
        out = state_of(block).block_fn.get(id(block), fam.block_forward)(block, *args, **kwargs)
    except FusedDitInputError as ex:
        return f"FusedDitInputError: {ex}"
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(torch.isfinite(o).all() for o in outs):
        return "non-finite output on a random probe input"
    return None


def _execution_device(model):
    """The device the model computes on: an offloading hook's (accelerate's ``execution_device``,
    group offloading's ``onload_device``), else the parameters'; None for meta without a hook."""
    def norm(d):
        d = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
        if d.type == "cuda" and d.index is None and torch.cuda.is_available():
            d = torch.device("cuda", torch.cuda.current_device())
        return d

    for m in model.modules():
        hf = getattr(m, "_hf_hook", None)
        for h in (getattr(hf, "hooks", None) or (hf,)) if hf is not None else ():
            d = getattr(h, "execution_device", None)
            if d is not None:
                return norm(d)
        reg = getattr(m, "_diffusers_hook", None)
        for h in getattr(reg, "hooks", {}).values():
            d = getattr(getattr(h, "group", None), "onload_device", None)
            if d is not None:
                return norm(d)
    p = next(model.parameters())
    return None if p.device.type == "meta" else p.device


def unpatch(model_or_pipeline) -> bool:
    """Undo :func:`patch` on this instance exactly (instance attributes removed, original processor
    objects restored). Returns False when the model was not patched."""
    model, fam = resolve(model_or_pipeline)
    rope = get(model, fam.rope_module)
    st = model.__dict__.get(ATTR) or rope.__dict__.get(ATTR)
    if st is None:
        st = next((b.__dict__[ATTR] for _, b, _ in blocks_of(model, fam) if ATTR in b.__dict__), None)
    if st is None or st.detached:
        return False
    if st.fp8 is not None:
        st.fp8.unpatch(st)
    st.attn_fp8 = None
    for attn, old in st.procs:
        attn.set_processor(old)
    for pk in [*(p for pair in st.packed_qkv.values() for p in pair), *st.packed_mod.values()]:
        pk.unpack()
    st.packed_qkv.clear()
    st.packed_mod.clear()
    st._silu = st._tables_of = st.prenorm = None
    st.clear_mod_cache()
    st.next_block.clear()
    ours = {id(model): _model_forward, id(rope): _rope_forward, **st.block_fn}
    under = set()
    for block, ref, attr, orig in st.inner_refs:
        fused = ours[id(block)]
        if getattr(getattr(ref, attr, None), "__func__", None) is fused:
            setattr(ref, attr, orig)  # the hooks call the block's own forward again
        if getattr(block.__dict__.get("forward"), "__func__", None) is not fused:
            under.add(id(block))  # (a hook removed since leaves ours as the forward: popped below)
            block.__dict__.pop(ATTR, None)
    st.inner_refs.clear()
    wrapped = []
    for m in [*st.patched_blocks, model, rope]:
        if id(m) in under:
            continue
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is not ours.get(id(m)):
            # a hook added after patching wraps our forward: removing ours would remove the hook too,
            # so ours stays under it and runs the stock code from now on (mode_stock below)
            wrapped.append(type(m).__name__)
            continue
        prev = st.prev_forward.get(id(m))
        if prev is not None:
            m.forward = prev
        else:
            m.__dict__.pop("forward", None)
        m.__dict__.pop(ATTR, None)
    st.tables.clear()
    st.mode_stock = st.detached = True  # anything of ours still reachable (under a hook) runs stock
    if wrapped:
        log.warning("fused_dit_ops.unpatch: %d module(s) (%s) had their forward wrapped by a hook after "
                    "patching; the wrappers are kept and run the stock code", len(wrapped),
                    ", ".join(sorted(set(wrapped))))
    return True
