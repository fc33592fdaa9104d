"""Layer profiler: fix one step and one layer, compare two configurations kernel by kernel.

``python -m fused_dit_ops profile`` builds the demo model (a Qwen-Image-Edit-2511 transformer with
random weights; the tiny config on CPU), runs it in two configurations (``--a`` / ``--b``: stock,
patched, stock-compile, patched-compile), captures one forward of each with ``torch.profiler``,
cuts out the kernels of one transformer block (``--layer``) and prints them side by side: name,
count, time, share of the block, the totals, and for memory-bound kernels the bandwidth-floor
ratio (minimum bytes moved / (measured copy bandwidth x time); 100% = as fast as a copy).

How one block is cut out: for the profiled forward only, the block is replaced in its parent by
a wrapper that runs the call inside ``torch.profiler.record_function`` (outside any compiled
region, so it works with ``compile_repeated_blocks`` too). On CUDA the call is also
bracketed by ``torch.cuda.synchronize()``, so the block's kernels run inside its time range; a
kernel is assigned to the block when the CPU launch that produced it (matched by correlation id)
lies inside the range, or, for a kernel without a matched launch, when its midpoint does. On CPU
the "kernels" are the CPU ops of the range, each counted with its self time.

``--model flux`` / ``flux2``: a Flux.1 / FLUX.2 transformer (FLUX.1-dev / FLUX.2-dev dims; tiny on
CPU) of ``--layers`` N double-stream + 2N single-stream blocks at 4096 image + 512 text tokens;
``--kind double`` (default) or ``--kind single`` picks the block list that ``--layer`` indexes.

``--model wan``: a Wan transformer of ``--layers`` N self + cross attention blocks, ``--config``
t2v-14b (default), ti2v-5b (per-token timestep), i2v-14b, t2v-1.3b or a14b (on the CPU the matching
tiny config), at 480p x 81 frames (latent 21 x 60 x 104: 32760 tokens) + 512 text tokens.

Per configuration, a second table splits the block's time into GEMMs, attention and the rest
(everything else: norms, modulation, RoPE, residuals, copies), each in us and as a share of the
block; the fused block aims at rest <= 12%. A kernel counts as attention or GEMM when its launching
op or an op enclosing it is one (attention first), except that a kernel whose own op is
memory-bound (a copy, an elementwise op) is rest; kernels of opaque ops (inductor's) go by name.

Configurations of a patched model may carry the benchmarks' patch options: ``--b
patched+nocollapse`` (Wan TI2V: no two-set timestep collapse), ``patched+nopack``, ...

Without a CUDA GPU (or with ``--device cpu``) it profiles the tiny config on the CPU: the rows
are CPU ops with their self time. That checks the tool and the patched model's wiring; it says
nothing about GPU kernels.

The same functions work on any model: see ``docs/profiler.md`` (:func:`profile_layer`,
:func:`format_comparison`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections import Counter, deque, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

MARK = "fused_dit.profile_block"

# -- what counts as memory-bound, and how many bytes an op must move at least -----------------------

# aten ops whose minimum traffic is "read every input, write one output as large as the largest input"
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "where", "neg", "exp", "tanh", "sigmoid",
    "silu", "silu_", "gelu", "gelu_", "relu", "relu_", "pow", "rsqrt", "sqrt", "addcmul", "addcmul_",
    "clamp", "clamp_", "clip", "masked_fill", "masked_fill_", "eq", "ne", "lt", "gt", "le", "ge",
    "native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", "native_group_norm", "softmax",
    "_softmax", "view_as_real", "view_as_complex", "sum", "mean", "fill_", "zero_",
    "_to_copy", "clone", "contiguous", "copy_", "cat", "stack", "index_select", "gather",
}
# fused_dit ops that are compute-bound (GEMMs, attention); every other op is memory-bound
_COMPUTE_BOUND = ("attention", "joint_linear", "swiglu_linear", "fp8_linear", "joint_fp8_linear", "attention_fp8")


def _writes_of(schema: str):
    """What a fused_dit op writes beyond reading its tensor inputs, from its schema (the op
    definitions in ``fused_dit_ops._schemas``, so a new op cannot be missing here):

    - no returns: ``("inplace", positions)`` for the tensor inputs it mutates in place (read and
      written), or 0 when every mutated input is an ``*_out`` buffer (its bytes are the write);
    - two streams (arguments suffixed ``_a`` / ``_b``): "3d", each output as large as its stream's
      3-D activations;
    - joint outputs (arguments prefixed ``txt_`` / ``img_``): "sum", the outputs are the six q/k/v
      activations concatenated;
    - else the number of returned tensors, each as large as the largest input."""
    s = torch._C.parse_schema("fused_dit::op" + schema)
    names = [a.name for a in s.arguments]
    if not s.returns:
        tensors = [a for a in s.arguments if str(a.type).startswith("Tensor")]
        mutated = [i for i, a in enumerate(tensors) if a.alias_info is not None and a.alias_info.is_write]
        if all(tensors[i].name.endswith("_out") for i in mutated):
            return 0
        return ("inplace", tuple(mutated))
    if any(n.endswith("_a") for n in names) and any(n.endswith("_b") for n in names):
        return "3d"
    if any(n.startswith("txt_") for n in names) and any(n.startswith("img_") for n in names):
        return "sum"
    return len(s.returns)


def _fused_writes() -> dict:
    from ._schemas import SCHEMAS
    return {name: _writes_of(schema) for name, schema in SCHEMAS.items() if name not in _COMPUTE_BOUND}


_FUSED_WRITES = _fused_writes()
# kernel-name hints for GPU kernels whose launching op is unknown or opaque (e.g. inductor's)
_MEMBOUND_KERNEL = re.compile(r"elementwise|reduce_kernel|layer_norm|rms_norm|norm_kernel|cat_|CatArray|"
                              r"copy|Memcpy|Memset|triton_poi|triton_per|triton_red|_scale_shift|"
                              r"_gate_residual|_norm_scale_shift|_joint_qk|rope|qkv_cat", re.I)
_COMPUTE_KERNEL = re.compile(r"gemm|cutlass|xmma|flash|fmha|attention|sm90_|sm80_|cublas|triton_tem|mm_",
                             re.I)

# -- GEMM / attention / rest --------------------------------------------------------------------------

REST_TARGET_PCT = 12.0  # the fused block's aim: everything but GEMMs and attention <= 12% of the block
_ATTENTION_OP = re.compile(r"attention|attn|flash|sdpa|fmha", re.I)
_GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "matmul", "linear", "_addmm_activation",
             "_scaled_mm", "addmv", "mv", "_int_mm", "dot", "einsum"}
_ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa", re.I)
_GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|triton_tem|splitK|_mm_|matmul", re.I)
# inductor's pointwise / reduction kernels, named after the ops they feed (e.g. a layout transform
# "triton_poi_fused__scaled_dot_product_flash_attention_0"): memory-bound whatever the name says
_INDUCTOR_MEMBOUND = re.compile(r"^triton_(poi|per|red)_")


def _is_attention_op(op: str) -> bool:
    ns, base = _op_base(op)
    return bool(_ATTENTION_OP.search(base) or _ATTENTION_OP.search(ns))


def _is_gemm_op(op: str) -> bool:
    ns, base = _op_base(op)
    if ns == "fused_dit":
        return base in _COMPUTE_BOUND and not _ATTENTION_OP.search(base)
    return ns == "aten" and base in _GEMM_OPS


def kernel_category(name: str, op: str = "", parents: Sequence[str] = ()) -> str:
    """"attention", "gemm" or "rest" for one kernel (CPU: one op). By the ops: a kernel whose own
    op is memory-bound is "rest" (e.g. a layout copy in front of an attention call); else the
    launching op and its enclosing ops (``parents``, innermost first) decide, attention before GEMM
    (the math backend's matmuls are attention); kernels of unknown or opaque ops (inductor's) go by
    their name (FlashAttention / cuDNN SDPA / fmha; cuBLAS / CUTLASS / nvjet / Triton templates);
    inductor's pointwise and reduction kernels (``triton_poi_`` / ``triton_per_`` / ``triton_red_``)
    are rest even where named after an attention or GEMM op they feed."""
    if op and op_is_memory_bound(op) or _INDUCTOR_MEMBOUND.match(name or "") or _INDUCTOR_MEMBOUND.match(op or ""):
        return "rest"
    chain = [o for o in (op, *parents) if o]
    if any(_is_attention_op(o) for o in chain):
        return "attention"
    if any(_is_gemm_op(o) for o in chain):
        return "gemm"
    if _ATTENTION_KERNEL.search(name or ""):
        return "attention"
    if _GEMM_KERNEL.search(name or "") and not kernel_is_memory_bound(name):
        return "gemm"
    return "rest"


def _parents(ev, stop: str = MARK, depth: int = 16) -> list[str]:
    """Names of the ops enclosing a profiler event, innermost first, up to the block's range."""
    out, p = [], getattr(ev, "cpu_parent", None)
    while p is not None and len(out) < depth and p.name != stop:
        out.append(p.name)
        p = getattr(p, "cpu_parent", None)
    return out


_ITEMSIZE = {
    "c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8, "int": 4, "long int": 8, "bool": 1,
    "unsigned char": 1, "signed char": 1, "short int": 2, "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1,
    "c10::complex<float>": 8, "c10::complex<double>": 16,
}


def _op_base(op: str) -> tuple[str, str]:
    """"aten::add_" -> ("aten", "add_"); "fused_dit::rope" -> ("fused_dit", "rope")."""
    if "::" in op:
        ns, base = op.split("::", 1)
        return ns, base
    return "", op


def op_is_memory_bound(op: str) -> bool | None:
    """True / False for ops we know; None for unknown ones."""
    ns, base = _op_base(op)
    if ns == "fused_dit":
        return base in _FUSED_WRITES
    if ns == "aten":
        if base in _ELEMENTWISE:
            return True
        if any(s in base for s in ("mm", "linear", "conv", "attention", "flash", "efficient", "cudnn")):
            return False
    return None


def kernel_is_memory_bound(kernel_name: str, op: str = "") -> bool:
    by_op = op_is_memory_bound(op) if op else None
    if by_op is not None:
        return by_op
    if _COMPUTE_KERNEL.search(kernel_name):
        return False
    return bool(_MEMBOUND_KERNEL.search(kernel_name))


def _flatten_shapes(shapes, dtypes):
    out = []
    for s, d in zip(shapes or [], dtypes or []):
        if isinstance(s, (list, tuple)) and s and all(isinstance(v, int) for v in s):
            size = _ITEMSIZE.get(d)
            if size is None:
                return None  # a tensor of unknown dtype: give up rather than guess
            n = 1
            for v in s:
                n *= v
            out.append(n * size)
    return out


def op_min_bytes(op: str, shapes, dtypes) -> int | None:
    """Minimum bytes an op moves (reads of every tensor input + the writes it must do), from the
    input shapes the profiler recorded; None where that is not inferable (unknown op, tensor lists)."""
    if not op_is_memory_bound(op):
        return None
    if dtypes and any(d in ("TensorList", "GenericList") for d in dtypes):
        return None
    sizes = _flatten_shapes(shapes, dtypes)
    if not sizes:
        return None
    reads, largest = sum(sizes), max(sizes)
    ns, base = _op_base(op)
    if ns == "fused_dit":
        w = _FUSED_WRITES[base]
        if isinstance(w, tuple):  # in place: the mutated tensors are read and written
            return reads + sum(sizes[i] for i in w[1] if i < len(sizes))
        if w == "sum":  # the six activations are written once more (cat outputs)
            return reads + sum(sizes[:6])
        if w == "3d":
            dims = [len(sh) for sh in shapes if isinstance(sh, (list, tuple)) and sh
                    and all(isinstance(v, int) for v in sh)]
            return reads + sum(n for n, d in zip(sizes, dims) if d == 3)
        return reads + w * largest
    if base in ("copy_",):
        return reads  # dst is an input: its bytes are the write
    if base in ("fill_", "zero_"):
        return largest
    if base in ("sum", "mean"):
        return reads
    return reads + largest


# -- kernel names -----------------------------------------------------------------------------------

_GENERIC_FUNCTORS = {"BinaryFunctor", "UnaryFunctor", "AUnaryFunctor", "BUnaryFunctor", "OpaqueType"}


def short_name(name: str, width: int = 64) -> str:
    """A readable kernel name: no ``void``, no argument list, namespaces dropped, template
    arguments reduced to the most telling functor (``vectorized_elementwise_kernel<MulFunctor>``)."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:]
    n = n.replace("(anonymous namespace)::", "")
    depth = 0
    for i, c in enumerate(n):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and i > 0:
            n = n[:i]
            break
    if "<" in n:
        head, rest = n.split("<", 1)
        head = head.rsplit("::", 1)[-1]
        idents = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest)
        functors = [i for i in idents if re.search(r"Functor|Op$|_kernel|_impl|func", i)]
        specific = [i for i in functors if i not in _GENERIC_FUNCTORS]
        pick = (specific or functors or [None])[-1 if specific else 0]
        n = head + (f"<{pick}>" if pick else "")
    else:
        n = n.rsplit("::", 1)[-1] if "::" in n and " " not in n else n
    n = n.strip()
    if len(n) > width:
        n = n[: width - 3] + "..."
    return n


def cpu_op_name(name: str, width: int = 64) -> str:
    """CPU op / range names as shown: inductor's graph hashes dropped."""
    n = re.sub(r"CompiledFxGraph [0-9a-z]{8,}", "CompiledFxGraph", name.strip())
    return n if len(n) <= width else n[: width - 3] + "..."


# -- data -------------------------------------------------------------------------------------------

@dataclass
class KernelRecord:
    name: str  # full name
    short: str  # display / grouping name
    op: str  # the op that launched it ("" if unknown); on CPU the op itself
    us: float
    bytes: int | None = None
    memory_bound: bool = False
    category: str = "rest"  # "gemm", "attention" or "rest" (kernel_category)


@dataclass
class LayerProfile:
    label: str
    device: str
    kernels: list[KernelRecord]
    range_us: float  # the block's CPU-side range (on CUDA: includes the closing synchronize)
    span_us: float | None = None  # first kernel start to last kernel end (CUDA)
    meta: dict = field(default_factory=dict)

    @property
    def total_us(self) -> float:
        return sum(k.us for k in self.kernels)

    def breakdown(self) -> dict:
        """The block's device time split into GEMMs, attention and the rest (everything else:
        norms, modulation, RoPE, residuals, copies), in us and as shares of the block; ``rest_ok``:
        rest within :data:`REST_TARGET_PCT` (CUDA profiles only; None on the CPU)."""
        total = self.total_us
        gemm = sum(k.us for k in self.kernels if k.category == "gemm")
        attn = sum(k.us for k in self.kernels if k.category == "attention")
        rest = total - gemm - attn

        def pct(v):
            return 100.0 * v / total if total > 0 else None
        return {"total_us": total, "gemm_us": gemm, "attention_us": attn, "rest_us": rest,
                "gemm_pct": pct(gemm), "attention_pct": pct(attn), "rest_pct": pct(rest),
                "rest_target_pct": REST_TARGET_PCT,
                "rest_ok": (pct(rest) <= REST_TARGET_PCT) if self.device == "cuda" and total > 0 else None}

    def summary(self) -> "OrderedDict[str, dict]":
        """Per short name: count, us, share (%), op, floor bytes/us where known, sorted by time."""
        groups: dict[str, dict] = {}
        total = self.total_us or 1.0
        for k in self.kernels:
            g = groups.setdefault(k.short, {"count": 0, "us": 0.0, "ops": Counter(), "bytes": 0, "bytes_us": 0.0,
                                            "memory_bound": k.memory_bound, "cats": Counter()})
            g["count"] += 1
            g["cats"][k.category] += k.us
            g["us"] += k.us
            if k.op:
                g["ops"][k.op] += 1
            if k.bytes is not None:
                g["bytes"] += k.bytes
                g["bytes_us"] += k.us
        for g in groups.values():
            g["share"] = 100.0 * g["us"] / total
            g["op"] = g["ops"].most_common(1)[0][0] if g["ops"] else ""
            g["category"] = g["cats"].most_common(1)[0][0] if g["cats"] else "rest"
            del g["ops"], g["cats"]
        return OrderedDict(sorted(groups.items(), key=lambda kv: -kv[1]["us"]))

    def to_dict(self) -> dict:
        return {"label": self.label, "device": self.device, "range_us": self.range_us, "span_us": self.span_us,
                "total_us": self.total_us, "breakdown": self.breakdown(), "meta": self.meta,
                "kernels": [k.__dict__ for k in self.kernels]}


# -- marking one block --------------------------------------------------------------------------------

class _MarkedBlock(torch.nn.Module):
    """Stands in for a block inside its parent while profiling: the block's call, in a named range."""

    def __init__(self, inner: torch.nn.Module, label: str, sync: bool):
        super().__init__()
        self.inner = inner
        self._label, self._sync = label, sync
        # a patched block's state reference: the patched model forward still sees a patched block here
        from .integrations.engine import ATTR
        if ATTR in inner.__dict__:
            self.__dict__[ATTR] = inner.__dict__[ATTR]

    def forward(self, *args, **kwargs):
        if self._sync:
            torch.cuda.synchronize()
        with torch.profiler.record_function(self._label):
            out = self.inner(*args, **kwargs)
            if self._sync:
                torch.cuda.synchronize()
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def find_parent(root: torch.nn.Module, block: torch.nn.Module):
    """(parent, attribute name) of ``block`` among ``root``'s modules, or None."""
    for mod in root.modules():
        for name, child in mod._modules.items():
            if child is block:
                return mod, name
    return None


@contextlib.contextmanager
def mark_block(block: torch.nn.Module, label: str = MARK, sync: bool = False, root: torch.nn.Module | None = None):
    """While active, every call of ``block`` runs inside ``record_function(label)`` (and, with
    ``sync``, between two ``torch.cuda.synchronize()``). The range is opened outside the block's
    own (possibly compiled) call. With ``root`` (the model), the block is replaced in its parent by
    a wrapper for the duration (the block object itself is untouched: no dynamo recompilation);
    without, the block's class is swapped for a subclass with a wrapping ``__call__`` (a compiled
    block then recompiles once, on the type guard)."""
    where = find_parent(root, block) if root is not None else None
    if where is not None:
        parent, name = where
        parent._modules[name] = _MarkedBlock(block, label, sync)
        try:
            yield block
        finally:
            parent._modules[name] = block
        return
    cls = block.__class__

    def __call__(self, *args, **kwargs):
        if sync:
            torch.cuda.synchronize()
        with torch.profiler.record_function(label):
            out = cls.__call__(self, *args, **kwargs)
            if sync:
                torch.cuda.synchronize()
        return out

    marked = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                         "__qualname__": cls.__qualname__})
    block.__class__ = marked
    try:
        yield block
    finally:
        block.__class__ = cls


def quiet_profiler_logs() -> None:
    """On a machine without a usable CUDA device, keep libkineto (torch.profiler's backend) from
    printing its C++ log lines, e.g. "gpuGetDeviceCount failed with code 35" from a CUDA build of
    torch without a driver, which say nothing about a CPU profile. Sets ``KINETO_LOG_LEVEL`` unless
    the user set it; kineto reads it when the process first starts a profiler."""
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above kineto's highest level: no log lines


# -- extraction ---------------------------------------------------------------------------------------

def _is_device_event(e) -> bool:
    dt = getattr(e, "device_type", None)
    return dt is not None and dt.name in ("CUDA", "PrivateUse1", "XPU", "HIP")


def _is_annotation(e, label) -> bool:
    """A GPU-side copy of a record_function range (not a kernel)."""
    if e.name == label or getattr(e, "is_user_annotation", False):
        return True
    act = str(getattr(e, "activity_type", "") or "")
    return "annotation" in act


def extract_block(events: Sequence, label: str = MARK, occurrence: int = 0, device: str = "cpu",
                  item_bytes_default: int | None = None) -> LayerProfile:
    """Cut the kernels of the ``occurrence``-th ``label`` range out of a profiler's events."""
    marks = sorted((e for e in events if e.name == label and not _is_device_event(e)),
                   key=lambda e: e.time_range.start)
    if len(marks) <= occurrence:
        raise RuntimeError(f"profiler range {label!r} not found ({len(marks)} occurrence(s)); "
                           "was the marked block called in the profiled run?")
    mark = marks[occurrence]
    t0, t1, thread = mark.time_range.start, mark.time_range.end, mark.thread
    cuda = any(_is_device_event(e) for e in events)
    kernels: list[KernelRecord] = []
    span = None
    if cuda:
        cpu = [e for e in events if not _is_device_event(e)]
        frontend = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}
        # launch (runtime/driver API) events share the kernel's correlation id (= FunctionEvent.id)
        runtime = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) > 0
                   or e.name.startswith(("cudaLaunch", "cuLaunch"))}
        # GPU-side copies of record_function ranges carry the range's name: never kernels
        annotation_names = {e.name for e in cpu if getattr(e, "is_user_annotation", False)}
        picked = []
        for k in events:
            if not _is_device_event(k) or _is_annotation(k, label) or k.name in annotation_names:
                continue
            rt = runtime.get(k.id)
            if rt is not None:
                inside = t0 <= rt.time_range.start <= t1
            else:
                mid = 0.5 * (k.time_range.start + k.time_range.end)
                inside = t0 <= mid <= t1
            if inside:
                picked.append(k)
        # Which op launched each kernel. torch's FunctionEvents carry no correlation ids, but each
        # CPU op lists the kernels it launched (``e.kernels``, linked by the profiler): match the
        # picked kernels to those lists by name, in launch order (one stream: same order).
        launch_op: dict[int, object] = {}
        if any(getattr(k, "linked_correlation_id", 0) for k in picked):
            for k in picked:
                lid = getattr(k, "linked_correlation_id", 0)
                if lid in frontend:
                    launch_op[id(k)] = frontend[lid]
        else:
            queues: dict[str, deque] = {}
            ops_in_range = sorted((e for e in cpu if getattr(e, "kernels", None)
                                   and t0 <= e.time_range.start <= t1), key=lambda e: e.time_range.start)
            for e in ops_in_range:
                for kk in e.kernels:
                    queues.setdefault(kk.name, deque()).append(e)
            for k in sorted(picked, key=lambda k: k.time_range.start):
                q = queues.get(k.name)
                if q:
                    launch_op[id(k)] = q.popleft()
        per_op = Counter(id(op_ev) for op_ev in launch_op.values())
        for k in picked:
            op_ev = launch_op.get(id(k))
            op = op_ev.name if op_ev is not None else ""
            mb = kernel_is_memory_bound(k.name, op)
            nbytes = None
            if mb and op_ev is not None and per_op[id(op_ev)] == 1:
                nbytes = op_min_bytes(op, op_ev.input_shapes, getattr(op_ev, "input_dtypes", None))
            us = k.time_range.end - k.time_range.start
            cat = kernel_category(k.name, op, _parents(op_ev, label) if op_ev is not None else ())
            kernels.append(KernelRecord(k.name, short_name(k.name), op, us, nbytes, mb, cat))
        if picked:
            span = max(k.time_range.end for k in picked) - min(k.time_range.start for k in picked)
    else:
        for e in events:
            if e is mark or e.name == label or e.thread != thread or _is_device_event(e):
                continue
            if getattr(e, "is_python_function", False):
                continue
            if not (t0 <= e.time_range.start and e.time_range.end <= t1):
                continue
            us = e.self_cpu_time_total
            if us <= 0:
                continue
            mb = bool(op_is_memory_bound(e.name))
            nbytes = None
            # bytes where the op itself moves the data (no memory-bound child op doing it)
            if mb and not any(op_is_memory_bound(c.name) for c in e.cpu_children):
                nbytes = op_min_bytes(e.name, e.input_shapes, getattr(e, "input_dtypes", None))
            kernels.append(KernelRecord(e.name, cpu_op_name(e.name), e.name, us, nbytes, mb,
                                        kernel_category("", e.name, _parents(e, label))))
    return LayerProfile(label=label, device="cuda" if cuda else device, kernels=kernels,
                        range_us=t1 - t0, span_us=span)


def profile_layer(run: Callable[[], object], block: torch.nn.Module, *, model: torch.nn.Module | None = None,
                  warmup: int = 2, label: str | None = None, occurrence: int = 0, trace: str | Path | None = None,
                  device: str | None = None, sync: bool | None = None) -> LayerProfile:
    """Profile ``run()`` (e.g. ``lambda: model(**inputs)``) and return the kernels of ``block``.

    ``model``: the module that contains ``block`` (recommended: the block is then marked through
    its parent, see :func:`mark_block`). ``warmup`` unprofiled runs first (compilation,
    autotuning, allocator), plus one with the marker in place; then one profiled run.
    ``occurrence``: which call of the block to cut out when ``run`` calls it several times.
    ``trace``: write the chrome trace (the whole profiled run) there. ``sync`` (default: on CUDA)
    brackets the block with ``torch.cuda.synchronize()`` so its kernels run inside its range.
    """
    if device is None:
        p = next(block.parameters(), None)
        device = p.device.type if p is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    sync = cuda if sync is None else sync
    label = label or MARK
    if not cuda:
        quiet_profiler_logs()

    def _sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(warmup):
            run()
        _sync()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with mark_block(block, label, sync=sync, root=model):
            run()  # a swapped class may cost a dynamo recompile: keep it out of the profile
            _sync()
            with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
                run()
                _sync()
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return extract_block(prof.events(), label, occurrence, device=torch.device(device).type)


# -- comparison table -----------------------------------------------------------------------------------

def comparison_rows(profiles: Sequence[LayerProfile], names: Sequence[str], bandwidth: float | None = None,
                    top: int = 30) -> list[dict]:
    """Rows of the side-by-side table: one per kernel name (the ``top`` slowest, the rest folded into
    one row), then the totals. Keys: kernel, op, and per config ``{name} n``, ``{name} us``,
    ``{name} %``, ``{name} floor%``."""
    sums = [p.summary() for p in profiles]
    keys = list(OrderedDict.fromkeys(k for s in sums for k in s))
    keys.sort(key=lambda k: -max(s.get(k, {}).get("us", 0.0) for s in sums))
    rows = []

    def cells(g, name):
        if not g:
            return {f"{name} n": None, f"{name} us": None, f"{name} %": None, f"{name} floor%": None}
        floor = None
        if bandwidth and g.get("bytes_us", 0) > 0 and g.get("bytes", 0) > 0:
            floor = 100.0 * g["bytes"] / bandwidth / (g["bytes_us"] * 1e-6)
        return {f"{name} n": g["count"], f"{name} us": g["us"], f"{name} %": g["share"], f"{name} floor%": floor}

    for k in keys[:top]:
        op = next((s[k]["op"] for s in sums if k in s and s[k]["op"]), "")
        op = "" if op == k or cpu_op_name(op) == k else op
        cat = next((s[k]["category"] for s in sums if k in s), "")
        row = {"kernel": k, "op": op if len(op) <= 40 else op[:37] + "...", "class": cat}
        for s, name in zip(sums, names):
            row.update(cells(s.get(k), name))
        rows.append(row)
    rest = keys[top:]
    if rest:
        row = {"kernel": f"({len(rest)} more kernel names)", "op": "", "class": ""}
        for s, name in zip(sums, names):
            gs = [s[k] for k in rest if k in s]
            row.update({f"{name} n": sum(g["count"] for g in gs) or None,
                        f"{name} us": sum(g["us"] for g in gs) or None,
                        f"{name} %": sum(g["share"] for g in gs) or None, f"{name} floor%": None})
        rows.append(row)
    total = {"kernel": "TOTAL (kernel time)", "op": "", "class": ""}
    for p, s, name in zip(profiles, sums, names):
        total.update({f"{name} n": len(p.kernels), f"{name} us": p.total_us, f"{name} %": 100.0 if p.kernels else 0.0,
                      f"{name} floor%": None})
    rows.append(total)
    return rows


def format_comparison(profiles: Sequence[LayerProfile], names: Sequence[str], bandwidth: float | None = None,
                      top: int = 30, title: str | None = None) -> str:
    """The side-by-side table as text (kernel, op, count / us / share / floor% per configuration),
    then the block's time lines and the speedup of each configuration over the first."""
    from .bench.harness import format_table
    rows = comparison_rows(profiles, names, bandwidth, top)
    cols = ["kernel", "op", "class"] + [f"{n} {c}" for n in names for c in ("n", "us", "%", "floor%")]
    lines = [title] if title else []
    lines.append(format_table(rows, cols))
    lines.append("")
    unit = "kernel" if profiles and profiles[0].device == "cuda" else "CPU-op self"
    for p, n in zip(profiles, names):
        span = f", GPU span {p.span_us:.1f} us" if p.span_us is not None else ""
        lines.append(f"{n}: {len(p.kernels)} kernels, {unit} time {p.total_us:.1f} us{span}, "
                     f"block range {p.range_us:.1f} us")
    lines.append(format_breakdown(profiles, names))
    if len(profiles) >= 2 and profiles[0].total_us > 0:
        for p, n in zip(profiles[1:], names[1:]):
            if p.total_us > 0:
                lines.append(f"{n} vs {names[0]}: {profiles[0].total_us / p.total_us:.2f}x "
                             f"({unit} time of the block)")
    if bandwidth:
        lines.append(f"floor% = minimum bytes / ({bandwidth / 1e9:.0f} GB/s measured copy bandwidth x time); "
                     "blank: compute-bound or bytes not inferable")
    return "\n".join(lines)


def breakdown_rows(profiles: Sequence[LayerProfile], names: Sequence[str]) -> list[dict]:
    """One row per configuration: the block's device time, GEMM, attention and rest (us and % of
    the block), and whether rest is within :data:`REST_TARGET_PCT` (CUDA)."""
    return [{"config": n, **p.breakdown()} for p, n in zip(profiles, names)]


def format_breakdown(profiles: Sequence[LayerProfile], names: Sequence[str]) -> str:
    """The breakdown table as text (see :func:`breakdown_rows`)."""
    from .bench.harness import format_table
    rows = breakdown_rows(profiles, names)
    for r in rows:
        r["rest_ok"] = {True: "yes", False: "NO", None: ""}[r["rest_ok"]]
    unit = "kernel" if profiles and profiles[0].device == "cuda" else "CPU-op self"
    cols = ["config", "total_us", "gemm_us", "gemm_pct", "attention_us", "attention_pct", "rest_us", "rest_pct",
            "rest_ok"]
    return (f"block time by class ({unit} time; rest = total - GEMM - attention, target <= "
            f"{REST_TARGET_PCT:g}% of the block):\n" + format_table(rows, cols))


def write_png(profiles: Sequence[LayerProfile], names: Sequence[str], path: str | Path, top: int = 20,
              title: str = "") -> bool:
    """Horizontal bar chart of the ``top`` slowest kernel names (one bar per configuration).
    Returns False (and prints why) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--png: matplotlib is not installed; skipping the chart (pip install matplotlib)", file=sys.stderr)
        return False
    sums = [p.summary() for p in profiles]
    keys = list(OrderedDict.fromkeys(k for s in sums for k in s))
    keys.sort(key=lambda k: -max(s.get(k, {}).get("us", 0.0) for s in sums))
    keys = keys[:top][::-1]
    h = 0.8 / max(1, len(profiles))
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(keys) + 1.5))
    for j, (s, n, p) in enumerate(zip(sums, names, profiles)):
        ys = [i + (len(profiles) - 1 - j) * h for i in range(len(keys))]  # first configuration on top
        ax.barh(ys, [s.get(k, {}).get("us", 0.0) for k in keys], height=h,
                label=f"{n} (total {p.total_us:.0f} us)")
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(keys))])
    ax.set_yticklabels([k[:60] for k in keys], fontsize=7)
    ax.set_xlabel("time in the block (us)")
    ax.set_title(title or "one block, kernel by kernel")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return True


# -- command line ---------------------------------------------------------------------------------------

def _dtype(s: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[s]


MODELS = ("qwen", "flux", "flux2", "wan")


def _config_name(spec: str) -> tuple[str, str, dict]:
    """(display name, base configuration, patch options) of "stock", "patched", "patched+nopack", ..."""
    base, opts = _configs_mod().split_modifiers(spec)
    mods = spec.strip().split("+")[1:]
    norm = _configs_mod().normalize(base)
    _configs_mod().whole_model_only(norm, "profile")
    return "+".join([norm, *mods]), norm, opts


def _configs_mod():
    from .bench import _configs
    return _configs


def _build(model: str, config: str | None, layers: int, layer: int, kind: str, device: str, dt, tokens,
           txt_len) -> tuple:
    """(model, inputs, block list attribute, meta) of ``--model``."""
    from . import models as M
    _configs = _configs_mod()
    cuda = torch.device(device).type == "cuda"
    if model in ("flux", "flux2"):
        table, build, make = ((M.FLUX_CONFIGS, M.build_flux_transformer, M.make_flux_inputs) if model == "flux" else
                              (M.FLUX2_CONFIGS, M.build_flux2_transformer, M.make_flux2_inputs))
        config = config or ("dev" if cuda else "tiny")
        if config not in table:
            raise SystemExit(f"--config {config!r} is not a {model} config; choose from {', '.join(table)}")
        attr = {"double": "transformer_blocks", "single": "single_transformer_blocks"}.get(kind)
        if attr is None:
            raise SystemExit(f"--kind {kind!r}: choose double or single")
        n = layers if kind == "double" else 2 * layers
        if not 0 <= layer < n:
            raise SystemExit(f"--layer {layer} is outside the model's {n} {kind}-stream blocks")
        m = build(config, num_layers=layers, num_single_layers=2 * layers, device=device, dtype=dt)
        inputs = make(m, img_tokens=_configs.parse_tokens(tokens), txt_len=txt_len)
        meta = {"model": model, "config": config, "layers": layers, "single_layers": 2 * layers, "kind": kind,
                "block": f"{attr}[{layer}]", "layer": layer, "device": device, "dtype": str(dt),
                "img_tokens": inputs["img_ids"].shape[0], "txt_len": inputs["encoder_hidden_states"].shape[1]}
    elif model == "wan":
        attr = "blocks"
        if config is not None and config not in M.WAN_CONFIGS:
            raise SystemExit(f"--config {config!r} is not a Wan config; choose from {', '.join(M.WAN_CONFIGS)}")
        if not cuda and config is not None and not config.startswith("tiny"):
            config = "tiny-ti2v" if config == "ti2v-5b" else "tiny-i2v" if config == "i2v-14b" else "tiny"
        config = config or ("t2v-14b" if cuda else "tiny")
        if not 0 <= layer < layers:
            raise SystemExit(f"--layer {layer} is outside the model's {layers} blocks")
        latent = _configs.parse_tokens(tokens)
        if latent is not None and len(latent) != 3:
            raise SystemExit("--tokens for wan is the latent frames,height,width (default 21,60,104: 480p, "
                             "81 frames; tiny 3,6,10)")
        m = M.build_wan_transformer(config, num_layers=layers, device=device, dtype=dt)
        inputs = M.make_wan_inputs(m, latent=latent, txt_len=txt_len,
                                   per_token=True if config.endswith("ti2v") else None)
        x = inputs["hidden_states"]
        pt, ph, pw = m.config.patch_size
        meta = {"model": "wan", "config": config, "layers": layers, "block": f"blocks[{layer}]", "layer": layer,
                "device": device, "dtype": str(dt), "latent": list(x.shape[2:]),
                "tokens": (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw),
                "txt_len": inputs["encoder_hidden_states"].shape[1],
                "per_token_timestep": inputs["timestep"].dim() == 2}
    elif model == "qwen":
        attr = "transformer_blocks"
        config = config or ("edit-2511" if cuda else "tiny")
        if not 0 <= layer < layers:
            raise SystemExit(f"--layer {layer} is outside the model's {layers} layers")
        m = M.build_qwen_image_transformer(config, num_layers=layers, device=device, dtype=dt)
        inputs = M.make_qwen_inputs(m, img_tokens=_configs.parse_tokens(tokens), txt_len=txt_len)
        meta = {"model": "qwen", "config": config, "layers": layers, "layer": layer, "device": device,
                "dtype": str(dt), "img_tokens": inputs["hidden_states"].shape[1],
                "txt_len": inputs["encoder_hidden_states"].shape[1]}
    else:
        raise SystemExit(f"--model {model!r}: choose from {', '.join(MODELS)}")
    return m, inputs, attr, meta


def run_profile(a: str = "stock", b: str = "patched", *, config: str | None = None, layers: int = 3, layer: int = 1,
                device: str | None = None, dtype: str | None = None, tokens=None, txt_len: int | None = None,
                warmup: int = 2, trace: str | None = None, model: str = "qwen",
                kind: str = "double") -> tuple[list[LayerProfile], list[str], dict]:
    """Build the demo model once and profile block ``layer`` of one forward in configurations a and b
    (stock, patched, stock-compile, patched-compile; a patched one may carry the benchmarks' patch
    options, e.g. "patched+nocollapse").

    ``model``: "qwen" (``layers`` blocks), "flux" / "flux2" (``layers`` double-stream + 2 x ``layers``
    single-stream blocks; ``kind`` "double" or "single" says which list ``layer`` indexes) or "wan"
    (``layers`` self + cross attention blocks; ``config`` t2v-14b, ti2v-5b, ...; on the CPU the
    matching tiny config)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    dt = _dtype(dtype) if dtype else (torch.bfloat16 if cuda else torch.float32)
    specs = [_config_name(x) for x in (a, b)]  # fails on a bad name before the model is built
    names = [n for n, _, _ in specs]
    m, inputs, attr, meta = _build(model, config, layers, layer, kind, device, dt, tokens, txt_len)
    _configs = _configs_mod()
    profiles = []
    for i, (name, base, opts) in enumerate(specs):
        info = _configs.apply(m, base, **opts)
        try:
            block = getattr(m, attr)[layer]
            path = Path(trace) / f"profile-{i}-{name.replace('+', '_')}.json" if trace else None
            prof = profile_layer(lambda: m(**inputs), block, model=m, warmup=warmup, trace=path, device=device)
            prof.meta.update(info)
            if path:
                prof.meta["trace"] = str(path)
            profiles.append(prof)
        finally:
            _configs.reset(m, base)
    return profiles, names, meta


def _title(meta: dict, names: Sequence[str]) -> str:
    vs = f"{names[0]} vs {names[1]}"
    if meta.get("model") in ("flux", "flux2"):
        return (f"{meta['model']} {meta['block']} of {meta['layers']} double + {meta['single_layers']} single blocks "
                f"({meta['config']}, {meta['device']}, {meta['dtype']}, L_img {meta['img_tokens']}, "
                f"L_txt {meta['txt_len']}): {vs}")
    if meta.get("model") == "wan":
        per = ", per-token timestep" if meta["per_token_timestep"] else ""
        return (f"wan {meta['block']} of {meta['layers']} ({meta['config']}, {meta['device']}, {meta['dtype']}, "
                f"latent {'x'.join(map(str, meta['latent']))} = {meta['tokens']} tokens, L_txt {meta['txt_len']}"
                f"{per}): {vs}")
    return (f"block {meta['layer']} of {meta['layers']} ({meta['config']}, {meta['device']}, {meta['dtype']}, "
            f"L_img {meta['img_tokens']}, L_txt {meta['txt_len']}): {vs}")


def main(argv=None) -> int:
    from .bench.harness import plain_doc
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops profile",
                                 description=plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="stock", help="first configuration: stock, patched, stock-compile, "
                                                  "patched-compile (default stock); a patched one may end in "
                                                  "patch options as in bench block, e.g. patched+nocollapse")
    ap.add_argument("--b", default="patched", help="second configuration (default patched)")
    ap.add_argument("--model", default="qwen", choices=MODELS,
                    help="qwen (Qwen-Image-Edit-2511, default), flux (Flux.1) or flux2 (FLUX.2): --layers N "
                         "double + 2N single blocks; wan (Wan2.1 / 2.2: --layers N self + cross attention blocks)")
    ap.add_argument("--kind", default="double", choices=("double", "single"),
                    help="flux, flux2: the block list --layer indexes (default double)")
    ap.add_argument("--config", default=None, help="model config (default edit-2511 on CUDA, tiny on CPU; "
                                                   "flux, flux2: dev on CUDA; wan: t2v-14b on CUDA, or ti2v-5b, "
                                                   "i2v-14b, t2v-1.3b, a14b; on the CPU the matching tiny one)")
    ap.add_argument("--layers", type=int, default=3, help="model depth (default 3)")
    ap.add_argument("--layer", type=int, default=1, help="which block to cut out (default 1)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="bf16 (CUDA default), fp16, fp32 (CPU default)")
    ap.add_argument("--tokens", "--img-tokens", dest="tokens", default=None,
                    help="image tokens per image, target first: e.g. 4096,4096 (default 4096,4096; tiny: 16,16; "
                         "flux, flux2: 4096; tiny 15); wan: latent frames,height,width (default 21,60,104; "
                         "tiny 3,6,10)")
    ap.add_argument("--txt-len", type=int, default=None, help="text tokens (default 208; tiny: 7; flux, flux2, "
                                                              "wan: 512)")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled forwards before the profiled one")
    ap.add_argument("--top", type=int, default=30, help="kernel names shown (the rest folded into one row)")
    ap.add_argument("--trace", default=None, help="directory for the chrome traces (one per configuration)")
    ap.add_argument("--png", default=None, help="write a bar chart there (needs matplotlib)")
    ap.add_argument("--json", default=None, help="write the kernels and the table there as JSON")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"fused_dit_ops profile: --device {device}, but CUDA is not available (torch {torch.__version__}); "
              "run it without --device for the CPU check of the tool")
        return 2
    if torch.device(device).type != "cuda":
        quiet_profiler_logs()
        print("note: no CUDA GPU in use: profiling the tiny config on the CPU. The rows are CPU ops with their "
              "self time; this checks the tool, it says nothing about GPU kernels (run it on a CUDA GPU).")

    profiles, names, meta = run_profile(args.a, args.b, config=args.config, layers=args.layers, layer=args.layer,
                                        device=device, dtype=args.dtype, tokens=args.tokens,
                                        txt_len=args.txt_len, warmup=args.warmup, trace=args.trace,
                                        model=args.model, kind=args.kind)
    from .bench import harness
    bw = harness.device_copy_bandwidth_bytes_per_s(meta["device"])
    title = _title(meta, names)
    print(format_comparison(profiles, names, bw, top=args.top, title=title))
    if args.trace:
        for p in profiles:
            print(f"chrome trace: {p.meta.get('trace')}")
    if args.png and write_png(profiles, names, args.png, title=title):
        print(f"chart: {args.png}")
    if args.json:
        doc = {"meta": meta, "bandwidth_bytes_per_s": bw, "names": names,
               "rows": comparison_rows(profiles, names, bw, args.top),
               "breakdown": breakdown_rows(profiles, names),
               "profiles": [p.to_dict() for p in profiles]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
