"""A small vocabulary for per-thread Mosaic GPU code written inside ``plgpu.inline_mgpu``.

Pallas' array-level Mosaic GPU code has no per-lane scatter, gather or scan (measured in jax
0.11.2: ``int_indexer_shape non-empty``, ``cumsum`` unimplemented), which a radix select needs.
``plgpu.inline_mgpu`` hands a function the raw MLIR builder inside the kernel; this module
keeps that code readable: unsigned 32-bit arithmetic on ``arith`` values, shared and global
memory through PTX with explicit addresses, warp shuffles, block barriers and structured loops.
Everything here emits code at trace time; nothing runs in Python per element.
"""

from __future__ import annotations

import contextlib

from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, llvm, nvvm, scf
from jax.experimental.mosaic.gpu import utils as mu


def i32():
  return ir.IntegerType.get_signless(32)


def i64():
  return ir.IntegerType.get_signless(64)


def c(v: int, ty=None):
  """An i32 (or ``ty``) constant; values >= 2**31 are taken as their uint32 bit pattern."""
  ty = ty or i32()
  bits = ir.IntegerType(ty).width
  v &= (1 << bits) - 1
  if v >= 1 << (bits - 1):
    v -= 1 << bits
  return arith.constant(ty, v)


def add(a, b):
  return arith.addi(a, b)


def sub(a, b):
  return arith.subi(a, b)


def mul(a, b):
  return arith.muli(a, b)


def band(a, b):
  return arith.andi(a, b)


def bor(a, b):
  return arith.ori(a, b)


def bxor(a, b):
  return arith.xori(a, b)


def bnot(a):
  return arith.xori(a, c(-1, a.type))


def shl(a, n):
  return arith.shli(a, n if isinstance(n, ir.Value) else c(n, a.type))


def sar(a, n):
  """Arithmetic (sign-filling) shift right."""
  return arith.shrsi(a, n if isinstance(n, ir.Value) else c(n, a.type))


def shr(a, n):
  """Logical (unsigned) shift right."""
  return arith.shrui(a, n if isinstance(n, ir.Value) else c(n, a.type))


def _cmp(pred):
  return lambda a, b: arith.cmpi(pred, a, b)


eq = _cmp(arith.CmpIPredicate.eq)
ne = _cmp(arith.CmpIPredicate.ne)
ult = _cmp(arith.CmpIPredicate.ult)
ule = _cmp(arith.CmpIPredicate.ule)
ugt = _cmp(arith.CmpIPredicate.ugt)
uge = _cmp(arith.CmpIPredicate.uge)
slt = _cmp(arith.CmpIPredicate.slt)
sle = _cmp(arith.CmpIPredicate.sle)
sgt = _cmp(arith.CmpIPredicate.sgt)
sge = _cmp(arith.CmpIPredicate.sge)


def land(a, b):
  return arith.andi(a, b)


def lor(a, b):
  return arith.ori(a, b)


def lnot(a):
  return arith.xori(a, arith.constant(ir.IntegerType.get_signless(1), 1))


def select(p, a, b):
  return arith.select(p, a, b)


def smin(a, b):
  return arith.minsi(a, b)


def smax(a, b):
  return arith.maxsi(a, b)






def as_i32(p):
  """0 / 1 of an i1."""
  return arith.extui(i32(), p)


def to_i64(a):
  return arith.extsi(i64(), a)








def thread_id():
  return arith.index_cast(i32(), gpu.thread_id(gpu.Dimension.x))


def barrier():
  """Every thread of the block (``bar.sync 0``); shared-memory writes before it are visible."""
  gpu.barrier()




def shfl_down(x, d: int):
  return nvvm.shfl_sync(c(-1), x, c(d), c(0x1F), nvvm.ShflKind.down)


def shfl_up(x, d: int):
  return nvvm.shfl_sync(c(-1), x, c(d), c(0), nvvm.ShflKind.up)


def ballot(p):
  """The warp's lanes where the i1 ``p`` holds, as a 32-bit mask; every lane of the warp must
  reach it (``vote.sync`` with a full member mask)."""
  return mu.inline_ptx(
      "{ .reg .pred q; setp.ne.b32 q, $1, 0; vote.sync.ballot.b32 $0, q, 0xffffffff; }",
      as_i32(p), result_types=i32(), has_side_effects=True, convergent=True)


def popc(x):
  return mu.inline_ptx("popc.b32 $0, $1;", x, result_types=i32())


def lanemask_lt():
  """The lanes below this one, as a 32-bit mask."""
  return mu.inline_ptx("mov.u32 $0, %lanemask_lt;", result_types=i32())






# ---------------------------------------------------------------- memory, by explicit address
def ptr(ref):
  """The base address of a memref: an llvm pointer (shared: addrspace 3, global: 0 / 1)."""
  return mu.memref_ptr(ref)


def gep(p, index, elt=None):
  """``p + index`` elements of ``elt`` (i32 by default); index is an i32 or i64 value."""
  return mu.getelementptr(p, [index], elt or i32())


def ld_shared(p):
  return mu.inline_ptx("ld.shared.b32 $0, [$1];", p, result_types=i32(), has_side_effects=True)


def ld_shared_v4(p):
  return mu.inline_ptx("ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", p,
                       result_types=[i32()] * 4, has_side_effects=True)


def st_shared(p, v, pred=None):
  mu.inline_ptx("st.shared.b32 [$0], $1;", p, v, predicate=pred, has_side_effects=True)


def st_shared_v4(p, vs, pred=None):
  mu.inline_ptx("st.shared.v4.b32 [$0], {$1, $2, $3, $4};", p, *vs, predicate=pred,
                has_side_effects=True)


def red_shared_add(p, v, pred=None):
  """A relaxed shared-memory reduction (no return value): PTX ``red.shared.add.u32``."""
  mu.inline_ptx("red.shared.add.u32 [$0], $1;", p, v, predicate=pred, has_side_effects=True)


def ld_global(p):
  """One 32-bit load from global memory (read-only path: the inputs are never written here)."""
  return mu.inline_ptx("ld.global.nc.b32 $0, [$1];", p, result_types=i32())


def ld_global_if(p, pred):
  """``*p`` where ``pred`` (an i1) holds, else an unspecified value; no access otherwise."""
  return mu.inline_ptx(
      "{ .reg .pred q; setp.ne.b32 q, $2, 0; mov.b32 $0, 0; @q ld.global.nc.b32 $0, [$1]; }",
      p, as_i32(pred), result_types=i32())


def ld_global_v4(p):
  """A 16-byte load from global memory; ``p`` must be 16-byte aligned."""
  return mu.inline_ptx("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", p,
                       result_types=[i32()] * 4)


def st_global(p, v, pred=None):
  mu.inline_ptx("st.global.b32 [$0], $1;", p, v, predicate=pred, has_side_effects=True)


def global_ptr(ref):
  """A global-memory pointer (addrspace 1) to a GMEM memref's first element."""
  p = ptr(ref)
  if llvm.PointerType(p.type).address_space == 1:
    return p
  return llvm.addrspacecast(llvm.PointerType.get(1), p)


# ----------------------------------------------------------------------------- control flow
@contextlib.contextmanager
def when(cond):
  with ir.InsertionPoint(scf.IfOp(cond).then_block):
    yield
    scf.yield_([])


def if_else(cond, then_fn, else_fn, types):
  """``then_fn()`` or ``else_fn()``, each returning a list of values of ``types``."""
  op = scf.IfOp(cond, types, has_else=True)
  with ir.InsertionPoint(op.then_block):
    scf.yield_(list(then_fn()))
  with ir.InsertionPoint(op.else_block):
    scf.yield_(list(else_fn()))
  return list(op.results)


def for_range(lo, hi, step, carry, body):
  """``for i in range(lo, hi, step)`` over i32 values; ``body(i, carry) -> carry`` (a list)."""
  step = step if isinstance(step, ir.Value) else c(step)
  op = scf.ForOp(lo, hi, step, list(carry))
  with ir.InsertionPoint(op.body):
    out = body(op.induction_variable, list(op.inner_iter_args))
    scf.yield_(list(out))
  return list(op.results)


RELEASES = ("barrier", "fence", "arrive")  # the ways a kernel may hand a ring slot back


def release_fence(release: str, interpret: bool = False) -> None:
  """What a thread runs between its last read of a TMA-filled ring slot and its arrive on
  the slot's free mbarrier (called from Pallas kernel code).

  ``release="barrier"``: ``plgpu.commit_smem`` (the fence below and a warpgroup barrier).
  ``"fence"``: ``fence.proxy.async.shared::cta`` alone (one ``plgpu.inline_mgpu`` op), which
  orders the thread's shared-memory reads before the refill's async-proxy (TMA) writes by the
  letter of the PTX memory model. ``"arrive"``: nothing, as DeepGEMM's and CUTLASS's Hopper
  pipelines release a slot (the reads have returned their values before the arrive).

  GPU interpret mode cannot run ``inline_mgpu``, and its race detector orders a thread's
  generic reads before a later TMA write only through ``plgpu.commit_smem`` (which it models
  as that fence; the barrier part is a no-op there): under ``interpret`` "fence" and
  "arrive" run ``commit_smem``, so the interpreter checks the mbarrier protocol, not the
  fence."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if release not in RELEASES:
    raise ValueError(f"release_fence: release must be one of {RELEASES}, got {release!r}")
  if interpret or release == "barrier":
    plgpu.commit_smem()
    return
  if release == "arrive":
    return

  @plgpu.inline_mgpu()
  def fence_async_shared_cta(ctx):
    del ctx
    nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

  fence_async_shared_cta()
