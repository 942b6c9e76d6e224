"""A small compiled CPU kernel for the torch backend's blockwise quantizer (the per-RL-step weight re-quantization).

Why: in eager torch the quantizer is a chain of passes (|x| bits, amax, fp32 division, fp8 cast), and torch's CPU
fp32 -> float8_e4m3fn cast and fp32 division each cost more than a memory copy of the same bytes, so eager torch
stays several times slower than ``dst.copy_(src)`` however it is chunked. This kernel does the same arithmetic in one
pass per cache-sized tile (amax, then divide, clamp and round while the tile is still in L2), and runs on Python
threads (ctypes releases the GIL), so it does not depend on OpenMP.

Exactness: plain C compiled without fast-math, so ``x / s`` is an IEEE division (GCC does not turn it into a
multiply by a reciprocal), and the fp8 rounding is done on the bits: round to nearest even at mantissa bit 20 for
results >= 2^-6, and the IEEE addition ``t + 2^23`` (which rounds ``t = |y| * 2^9`` to an integer, ties to even)
below it, where fp8 is subnormal. The tests compare it bit for bit with the pure-torch path and with a slow
block-by-block reference. Supported inputs: bf16 and fp32 rows with unit stride; everything else takes the
pure-torch path.

The shared library is built once with the system C compiler into ``$XDG_CACHE_HOME/helpers_fp8`` (default
``~/.cache``), keyed by a hash of the source, the flags and the CPU; without a compiler, :func:`available` is False
and the caller warns and uses the pure-torch path (``HELPERS_FP8_NATIVE=0`` chooses that path silently).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["NATIVE_ENV", "SUPPORTED_DTYPES", "available", "enabled", "quant_blocks_native", "supports"]

NATIVE_ENV = "HELPERS_FP8_NATIVE"  # set to 0 to force the pure-torch quantizer

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)
# Columns per tile: a 128-row bf16 tile of 2048 columns is 512 KiB, well inside a 2 MiB L2 with its fp8 output.
TILE_COLS = 2048

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define FP8_MAX 448.0f
#define SCALE_EPS 1e-10f

static inline float f_from_u(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t u_from_f(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* max(amax, eps) / 448 (NaN propagates), optionally rounded up to a power of two on the bits. */
static inline float scale_from_amax(float amax, int ue8m0) {
    float s = (amax < SCALE_EPS ? SCALE_EPS : amax) / FP8_MAX;
    if (ue8m0) {
        uint32_t b = u_from_f(s);
        if (b < 0x7F800000u) s = f_from_u((b + 0x007FFFFFu) & 0x7F800000u);
    }
    return s;
}

/* Round-to-nearest-even fp32 -> float8_e4m3fn code; y is NaN or already clamped to [-448, 448]. */
static inline uint8_t encode_e4m3(float y) {
    uint32_t b = u_from_f(y);
    uint32_t sign = (b >> 24) & 0x80u;
    uint32_t a = b & 0x7FFFFFFFu;
    uint32_t r = a + 0x7FFFFu + ((a >> 20) & 1u);          /* RNE at mantissa bit 20 */
    uint32_t normal = (r >> 20) - (120u << 3);              /* rebias the exponent 127 -> 7 */
    /* Subnormal range: t = |y| * 2^9 (exact) in [0, 8]; t + 2^23 rounds t to an integer (IEEE RNE) and that
       integer is the low mantissa bits of the sum (its ulp is 1): no float -> int conversion needed. */
    float t = f_from_u(a) * 512.0f;
    uint32_t sub = u_from_f(t + 8388608.0f) - 0x4B000000u;
    uint32_t code = a >= 0x3C800000u ? normal : sub;         /* 2^-6: the smallest normal fp8 */
    code = a > 0x7F800000u ? 0x7Fu : code;                   /* NaN */
    return (uint8_t)(sign | code);
}

#define DEFINE_QUANT(NAME, T, ABS_BITS, TO_F32, ABS_MASK)                                                  \
void NAME(const T* restrict x, int64_t ldx, uint8_t* restrict q, int64_t ldq, float* restrict s, int64_t lds,    \
          int64_t N, int64_t K, int64_t bn, int64_t bk, int ue8m0, int64_t rb_begin, int64_t rb_end,              \
          int64_t tile_cols) {                                                                                      \
    float scale[4096];                                                                                      \
    ABS_BITS amax[4096];                                                                                    \
    for (int64_t rb = rb_begin; rb < rb_end; rb++) {                                                        \
        int64_t r0 = rb * bn, r1 = r0 + bn < N ? r0 + bn : N;                                              \
        for (int64_t c0 = 0; c0 < K; c0 += tile_cols) {                                                     \
            int64_t c1 = c0 + tile_cols < K ? c0 + tile_cols : K;                                          \
            int64_t nblk = (c1 - c0 + bk - 1) / bk;                                                         \
            for (int64_t j = 0; j < nblk; j++) amax[j] = 0;                                                 \
            for (int64_t r = r0; r < r1; r++) {                                                             \
                const T* xr = x + r * ldx;                                                                  \
                for (int64_t j = 0; j < nblk; j++) {                                                        \
                    int64_t k0 = c0 + j * bk, k1 = k0 + bk < c1 ? k0 + bk : c1;                            \
                    ABS_BITS m = amax[j];                                                                   \
                    for (int64_t k = k0; k < k1; k++) {                                                     \
                        ABS_BITS v = (ABS_BITS)(xr[k] & ABS_MASK);                                          \
                        m = v > m ? v : m;                                                                  \
                    }                                                                                       \
                    amax[j] = m;                                                                            \
                }                                                                                           \
            }                                                                                               \
            for (int64_t j = 0; j < nblk; j++) {                                                            \
                scale[j] = scale_from_amax(TO_F32(amax[j]), ue8m0);                                         \
                s[rb * lds + c0 / bk + j] = scale[j];                                                       \
            }                                                                                               \
            for (int64_t r = r0; r < r1; r++) {                                                             \
                const T* xr = x + r * ldx;                                                                  \
                uint8_t* qr = q + r * ldq;                                                                  \
                for (int64_t j = 0; j < nblk; j++) {                                                        \
                    int64_t k0 = c0 + j * bk, k1 = k0 + bk < c1 ? k0 + bk : c1;                            \
                    float sj = scale[j];                                                                    \
                    for (int64_t k = k0; k < k1; k++) {                                                     \
                        float y = TO_F32(xr[k]) / sj;                                                       \
                        y = y < -FP8_MAX ? -FP8_MAX : (y > FP8_MAX ? FP8_MAX : y);                          \
                        qr[k] = encode_e4m3(y);                                                             \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
}

static inline float bf16_to_f32(uint16_t h) { return f_from_u(((uint32_t)h) << 16); }
static inline float f32_bits_to_f32(uint32_t u) { return f_from_u(u); }

DEFINE_QUANT(quant_bf16, uint16_t, uint16_t, bf16_to_f32, 0x7FFFu)
DEFINE_QUANT(quant_f32, uint32_t, uint32_t, f32_bits_to_f32, 0x7FFFFFFFu)
"""
# The per-tile scale buffers hold 4096 blocks: tile_cols / bk must not exceed that.
_MAX_TILE_BLOCKS = 4096
# No -ffast-math and no FMA contraction: the division and the magic-number rounding must stay IEEE. 512-bit
# vectors where the CPU has them (measured ~1.6x faster on the quantize loop here); elsewhere the flag is a no-op.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-shared", "-fPIC", "-std=c11",
           "-fno-fast-math", "-ffp-contract=off"]

_lib = None
_lib_error: str | None = None


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        info = [platform.processor()]
    return "".join(info)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc / cc) found")
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_CFLAGS), _cpu_key(), platform.machine()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "helpers_fp8"
    lib_path = cache / f"fp8quant_{key.hexdigest()[:16]}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "fp8quant.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "fp8quant.so"
            proc = subprocess.run([cc, *_CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling the fp8 CPU kernel failed: {proc.stderr[-2000:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(lib_path))
    argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for name in ("quant_bf16", "quant_f32"):
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    return lib


def enabled() -> bool:
    """False when the environment variable ``HELPERS_FP8_NATIVE=0`` asks for the pure-torch path."""
    return os.environ.get(NATIVE_ENV, "1").strip() != "0"


def available() -> bool:
    """True when the compiled kernel could be built / loaded (built on first call; later calls are free)."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            _lib = _build()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _lib_error = str(exc)
    return _lib is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _lib_error


def supports(x: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether :func:`quant_blocks_native` handles this input (CPU, bf16/fp32, unit column stride)."""
    return (x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES and x.ndim == 2 and x.stride(1) == 1
            and max(TILE_COLS, block[1]) // block[1] <= _MAX_TILE_BLOCKS)


def quant_blocks_native(
    x: torch.Tensor, block: tuple[int, int], scale_fmt: str, out: torch.Tensor, scale_out: torch.Tensor,
    num_threads: int | None = None,
) -> None:
    """Fill ``out`` (float8_e4m3fn [N, K], contiguous) and ``scale_out`` (fp32 [nb, kb], contiguous) from ``x``.

    Same semantics as :func:`helpers.fp8.reference.quant_blocks_torch` (no finiteness check: a non-finite block
    gets a NaN / inf scale). Row blocks are split into contiguous ranges over ``num_threads`` Python threads
    (default ``torch.get_num_threads()``).
    """
    if not available():
        raise RuntimeError(f"the compiled fp8 CPU kernel is unavailable: {_lib_error or NATIVE_ENV + '=0'}")
    assert supports(x, block), (x.device, x.dtype, x.shape, x.stride(), block)
    assert out.is_contiguous() and scale_out.is_contiguous()
    N, K = x.shape
    bn, bk = block
    nb = -(-N // bn)
    tile = max(TILE_COLS // bk, 1) * bk
    fn = _lib.quant_bf16 if x.dtype == torch.bfloat16 else _lib.quant_f32
    ue8m0 = int(scale_fmt == "ue8m0")

    def run(rb_range: tuple[int, int]) -> None:
        fn(x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), scale_out.data_ptr(), scale_out.stride(0),
           N, K, bn, bk, ue8m0, rb_range[0], rb_range[1], tile)

    threads = max(1, min(num_threads or torch.get_num_threads(), nb))
    # Small tensors are not worth a thread pool.
    if threads == 1 or x.numel() < (1 << 20):
        run((0, nb))
        return
    bounds = [nb * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(run, zip(bounds[:-1], bounds[1:])))
