"""oneDNN convolutions, matmuls, max pooling and BatchNorm on CPU: csrc/'s FFI handlers, VJPs, sharding.

`conv2d(x, kernel, strides, pads)` computes lax.conv_general_dilated's NHWC x
HWIO convolution with oneDNN 3.2 (the library under PyTorch's and Intel
Caffe's CPU convolutions): forward, backward-data and backward-weights are one
FFI handler each, and a custom_vjp makes gradients use the backward
primitives. Under a mesh whose "data" axis shards the batch (train.py's), each
device runs oneDNN on its own shard through shard_map, and the weight
gradient is summed over the axis (XLA combines these sums with the rest of
the step's gradient all-reduce).

Compute may be bfloat16 (AMX or AVX512-BF16 kernels where the CPU has them):
the kernel stays float32 outside, is cast for the forward and backward-data
primitives, and its gradient comes back in float32 from oneDNN's
accumulation.

`dense(x, kernel)` is a fully connected layer's x @ kernel with oneDNN's
matmul (the forward and both gradients), sharded and cast as conv2d is.

`max_pool(x, window, strides, pads)` is flax.linen.max_pool's NHWC max
pooling (padding never the maximum) with oneDNN's forward and backward
primitives; the backward call reads where each maximum was from the forward
call's workspace.

`batch_norm` is BatchNorm's training mode (statistics over groups of
examples, as models.layers.BatchNorm) with oneDNN's forward and backward
primitives, where each group lies within one device's shard.

The extension is compiled when the project is installed (`pip install .`, or `make build` for
the repository's .venv: CMakeLists.txt) into site-packages/models/; `library()` finds it through
the installed distribution's file list, and raises NotBuilt with the command when it is missing.
"""

import ctypes
import functools
import importlib.metadata
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

LIBRARY = "liblargebatch_onednn.so"
ONEDNN_LIBRARY = "libdnnl.so.3"  # of the onednn-cpu-gomp wheel
BUILD_COMMAND = "pip install ."  # `make build` runs it for the repository's .venv
TARGETS = (
    "lb_conv_forward",
    "lb_conv_backward_data",
    "lb_conv_backward_weights",
    "lb_batch_norm_forward",
    "lb_batch_norm_backward",
    "lb_matmul",
    "lb_max_pool_forward",
    "lb_max_pool_backward",
)
BATCH_AXIS = "data"  # the mesh axis train.py shards the batch over
DTYPES = (jnp.float32, jnp.bfloat16)


class NotBuilt(RuntimeError):
    """The C++ extension is missing (or does not load)."""


def installed_file(distribution: str, name: str) -> pathlib.Path | None:
    """Where an installed distribution put a file called `name` (its RECORD), or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((pathlib.Path(f.locate()) for f in files if f.name == name), None)


@functools.cache
def library() -> ctypes.CDLL:
    """The extension, loaded once, its FFI targets registered with XLA's CPU backend."""
    path = installed_file("largebatch", LIBRARY)
    if path is None or not path.exists():
        raise NotBuilt(
            f"the oneDNN extension is not installed in this Python environment ({sys.prefix}); run "
            f"`{BUILD_COMMAND}` in the repository (`make build` for its .venv; needs a C++ compiler)."
        )
    # oneDNN's OpenMP threads sleep between calls instead of spinning, so that XLA's own threads
    # have the cores for the elementwise work in between (libgomp reads it when the library
    # below first loads it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        onednn = installed_file("onednn-cpu-gomp", ONEDNN_LIBRARY)
        if onednn is not None:  # the extension's libdnnl.so.3, wherever this environment keeps it
            ctypes.CDLL(str(onednn), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NotBuilt(
            f"the oneDNN extension {path} does not load ({e}); reinstall it with `{BUILD_COMMAND}`."
        ) from None
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    lib.lb_onednn_isa.restype = ctypes.c_char_p
    lib.lb_batch_norm_workspace_bytes.restype = ctypes.c_int64
    lib.lb_batch_norm_workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_float, ctypes.c_int64]
    lib.lb_max_pool_workspace_bytes.restype = ctypes.c_int64
    lib.lb_max_pool_workspace_bytes.argtypes = [ctypes.c_int64] * 13 + [ctypes.c_int, ctypes.c_int64]
    return lib


def isa() -> str:
    """The instruction set oneDNN dispatches to here, e.g. "AVX2" or "AVX-512 + AMX (BF16/INT8)"."""
    return library().lb_onednn_isa().decode()


def version() -> str:
    v = library().lb_onednn_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


@functools.cache
def bfloat16_supported() -> bool:
    """Whether oneDNN has bfloat16 convolutions on this CPU (AVX512-BF16 or AMX; not AVX2 alone)."""
    x, kernel = jnp.ones((1, 4, 4, 8), jnp.bfloat16), jnp.ones((3, 3, 8, 8), jnp.float32)
    try:
        jax.block_until_ready(conv2d(x, kernel, (1, 1), (1, 1, 1, 1)))
        return True
    except jax.errors.JaxRuntimeError as e:
        if "oneDNN has no convolution" not in str(e):
            raise
        return False


def threads_per_device() -> int:
    """OpenMP threads for one device's calls: this process's cores (or $OMP_NUM_THREADS, e.g. a
    launcher's share of a machine it splits between processes) over its XLA devices, so that
    devices running concurrently do not oversubscribe the cores."""
    return max(1, library().lb_process_cores() // jax.local_device_count())


def _call(target: str, result: jax.ShapeDtypeStruct, a, b, strides, pads):
    library()
    return jax.ffi.ffi_call(target, result)(
        a,
        b,
        strides=np.asarray(strides, np.int64),
        pads=np.asarray(pads, np.int64),
        threads=np.int64(threads_per_device()),
    )


def _output_hw(x_shape, window, strides, pads) -> tuple[int, int]:
    (_, h, w, _), (kh, kw) = x_shape, window
    return (h + pads[0] + pads[1] - kh) // strides[0] + 1, (w + pads[2] + pads[3] - kw) // strides[1] + 1


def _crop_to_windows(x, window, strides, pads):
    """x without the rows and columns past the last window (never read; oneDNN wants them gone), and
    the bottom and right pads that the output size then implies."""
    (kh, kw), (sh, sw) = window, strides
    oh, ow = _output_hw(x.shape, window, strides, pads)
    x = x[:, : (oh - 1) * sh + kh - pads[0], : (ow - 1) * sw + kw - pads[2], :]
    return x, (pads[0], (oh - 1) * sh + kh - pads[0] - x.shape[1], pads[2], (ow - 1) * sw + kw - pads[2] - x.shape[2])


def _forward(x, kernel, strides, pads):
    oh, ow = _output_hw(x.shape, kernel.shape[:2], strides, pads)
    result = jax.ShapeDtypeStruct((x.shape[0], oh, ow, kernel.shape[3]), x.dtype)
    return _call("lb_conv_forward", result, x, kernel, strides, pads)


def _backward_data(dy, kernel, x_shape, strides, pads):
    result = jax.ShapeDtypeStruct((dy.shape[0],) + tuple(x_shape[1:]), dy.dtype)
    return _call("lb_conv_backward_data", result, dy, kernel, strides, pads)


def _backward_weights(x, dy, kernel_shape, strides, pads, sharded: bool):
    result = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
    dw = _call("lb_conv_backward_weights", result, x, dy, strides, pads)
    return jax.lax.psum(dw, BATCH_AXIS) if sharded else dw


def _batch_mesh():
    """The mesh whose "data" axis shards the batch, or None (one device, or no mesh set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names or mesh.shape[BATCH_AXIS] == 1:
        return None
    return mesh


BATCHED, REPLICATED = P(BATCH_AXIS), P()


def _per_device(fn, batched: tuple, replicated: tuple, out_specs):
    """fn(*batched, *replicated, sharded=...) on each device's shard of the batch (or once, without a
    mesh); out_specs says which outputs are batched (BATCHED) and which summed inside fn (REPLICATED)."""
    mesh = _batch_mesh()
    if mesh is None:
        return fn(*batched, *replicated, sharded=False)
    specs = (BATCHED,) * len(batched) + (REPLICATED,) * len(replicated)
    return jax.shard_map(functools.partial(fn, sharded=True), mesh=mesh, in_specs=specs, out_specs=out_specs)(
        *batched, *replicated
    )


def conv2d(x, kernel, strides: tuple[int, int], pads: tuple[int, int, int, int]):
    """oneDNN's NHWC x HWIO convolution in x's dtype (float32 or bfloat16).

    Args:
      x: [N, H, W, C], float32 or bfloat16 (the compute dtype).
      kernel: [KH, KW, C, O], float32 (cast to x's dtype for the primitives).
      strides: (height, width).
      pads: (top, bottom, left, right), as lax's explicit padding.

    Returns:
      [N, OH, OW, O] in x's dtype; its gradient with respect to the kernel is
      float32 from oneDNN's accumulation.
    """
    (kh, kw), (sh, sw) = kernel.shape[:2], strides
    if (kh, kw) == (1, 1) and pads == (0, 0, 0, 0):
        # A strided 1x1 convolution reads every s-th pixel: take them, then one GEMM-shaped call.
        return _conv2d(x[:, ::sh, ::sw, :], kernel, (1, 1), pads)
    x, pads = _crop_to_windows(x, (kh, kw), strides, pads)
    return _conv2d(x, kernel, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, strides, pads):
    return _forward_rule(x, kernel, strides, pads)[0]


def _forward_rule(x, kernel, strides, pads):
    if x.dtype not in DTYPES:
        raise TypeError(f"onednn conv2d computes in float32 or bfloat16, not {x.dtype}.")
    weights = kernel.astype(x.dtype)
    run = lambda x, w, sharded: _forward(x, w, strides, pads)  # noqa: E731
    return _per_device(run, (x,), (weights,), BATCHED), (x, kernel)


def _backward_rule(strides, pads, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    weights = kernel.astype(x.dtype)
    data = lambda dy, w, sharded: _backward_data(dy, w, x.shape, strides, pads)  # noqa: E731
    dx = _per_device(data, (dy,), (weights,), BATCHED)
    grads = lambda x, dy, sharded: _backward_weights(x, dy, kernel.shape, strides, pads, sharded)  # noqa: E731
    dw = _per_device(grads, (x, dy), (), REPLICATED)
    return dx, dw.astype(kernel.dtype)


_conv2d.defvjp(_forward_rule, _backward_rule)


# --------------------------------------------------------------------------
# BatchNorm, training mode.
# --------------------------------------------------------------------------


def batch_norm(x, scale, shift, group_size: int | None, epsilon: float, relu: bool = False):
    """Training-mode BatchNorm over groups of `group_size` consecutive examples (None: the whole batch),
    and optionally the ReLU after it, inside the same oneDNN primitives.

    Args:
      x: [N, H, W, C], float32 or bfloat16.
      scale, shift: [C] float32.
      group_size: examples per group; each group must lie within one device's
        shard of the batch.
      epsilon: added to the variance.
      relu: y = relu(BN(x)): oneDNN's fuse_norm_relu, which saves XLA a pass
        over the tensor each way (the backward call reads a bitmask of the
        positive outputs, oneDNN's workspace, instead of y).

    Returns:
      (y in x's dtype, mean [G, C], biased variance [G, C]) with G groups, or
      None where oneDNN cannot do it here (statistics across devices, another
      dtype): the caller computes it itself.
    """
    if x.ndim != 4 or x.dtype not in DTYPES:
        return None
    mesh = _batch_mesh()
    devices = 1 if mesh is None else mesh.shape[BATCH_AXIS]
    local = x.shape[0] // devices
    group = local if group_size is None and devices == 1 else group_size
    if group is None or local % group:
        return None
    return _batch_norm(x, scale, shift, group, float(epsilon), bool(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm(x, scale, shift, group, epsilon, relu):
    return _batch_norm_forward(x, scale, shift, group, epsilon, relu)[0]


def _workspace_bytes(x_shape, dtype, group: int, epsilon: float) -> int:
    """Bytes of oneDNN's forward-to-backward workspace for one group of a call with relu."""
    _, h, w, c = x_shape
    bf16 = int(dtype == jnp.bfloat16)
    size = library().lb_batch_norm_workspace_bytes(group, h, w, c, bf16, epsilon, threads_per_device())
    if size < 0:
        raise RuntimeError(f"oneDNN has no batch normalization with ReLU for {x_shape} {dtype} on this CPU.")
    return size


def _batch_norm_call(target, results, group, epsilon, relu, *operands):
    library()
    call = jax.ffi.ffi_call(target, results)
    threads = np.int64(threads_per_device())
    return call(*operands, group=np.int64(group), epsilon=np.float32(epsilon), threads=threads, relu=relu)


def _batch_norm_forward(x, scale, shift, group, epsilon, relu):
    def run(x, scale, shift, sharded):
        stats = jax.ShapeDtypeStruct((x.shape[0] // group, x.shape[-1]), jnp.float32)
        results = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
        if relu:
            workspace = _workspace_bytes(x.shape, x.dtype, group, epsilon)
            results += (jax.ShapeDtypeStruct((x.shape[0] // group, workspace), jnp.uint8),)
        return tuple(_batch_norm_call("lb_batch_norm_forward", results, group, epsilon, relu, x, scale, shift))

    y, mean, var, *workspace = _per_device(run, (x,), (scale, shift), (BATCHED,) * (4 if relu else 3))
    return (y, mean, var), (x, scale, mean, var, *workspace)


def _batch_norm_backward(group, epsilon, relu, residuals, cotangents):
    x, scale, mean, var, *workspace = residuals
    dy = cotangents[0].astype(x.dtype)  # mean and var only feed the running averages: no gradient

    def run(x, dy, mean, var, *workspace_and_scale, sharded):
        *workspace, scale = workspace_and_scale
        channels = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
        results = (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels)
        operands = (x, dy, scale, mean, var, *workspace)
        dx, dscale, dshift = _batch_norm_call("lb_batch_norm_backward", results, group, epsilon, relu, *operands)
        if sharded:  # each device's share of the parameter gradients
            dscale, dshift = jax.lax.psum((dscale, dshift), BATCH_AXIS)
        return dx, dscale, dshift

    return _per_device(run, (x, dy, mean, var, *workspace), (scale,), (BATCHED, REPLICATED, REPLICATED))


_batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)


# --------------------------------------------------------------------------
# Fully connected layers.
# --------------------------------------------------------------------------


def _matmul(a, b, result_dtype, transpose_a=False, transpose_b=False):
    """op(a) @ op(b) through lb_matmul, op = transpose where asked (read through strides, no copy)."""
    library()
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    result = jax.ShapeDtypeStruct((m, n), result_dtype)
    call = jax.ffi.ffi_call("lb_matmul", result)
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b, threads=np.int64(threads_per_device()))


@jax.custom_vjp
def dense(x, kernel):
    """oneDNN's x @ kernel in x's dtype (float32 or bfloat16): a fully connected layer without its bias.

    Args:
      x: [N, K], float32 or bfloat16 (the compute dtype), its rows sharded
        over the mesh's "data" axis as conv2d's batch is.
      kernel: [K, O], float32 (cast to x's dtype for the primitives).

    Returns:
      [N, O] in x's dtype (oneDNN accumulates in float32 and rounds once); the
      kernel's gradient is float32 from oneDNN's accumulation.
    """
    return _dense_forward(x, kernel)[0]


def _dense_forward(x, kernel):
    if x.ndim != 2 or x.dtype not in DTYPES:
        raise TypeError(f"onednn dense takes a float32 or bfloat16 matrix, not {x.dtype}{list(x.shape)}.")
    weights = kernel.astype(x.dtype)
    run = lambda x, w, sharded: _matmul(x, w, x.dtype)  # noqa: E731
    return _per_device(run, (x,), (weights,), BATCHED), (x, kernel)


def _dense_backward(residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    weights = kernel.astype(x.dtype)
    data = lambda dy, w, sharded: _matmul(dy, w, x.dtype, transpose_b=True)  # noqa: E731
    dx = _per_device(data, (dy,), (weights,), BATCHED)

    def grads(x, dy, sharded):
        dw = _matmul(x, dy, jnp.float32, transpose_a=True)
        return jax.lax.psum(dw, BATCH_AXIS) if sharded else dw

    dw = _per_device(grads, (x, dy), (), REPLICATED)
    return dx, dw.astype(kernel.dtype)


dense.defvjp(_dense_forward, _dense_backward)


# --------------------------------------------------------------------------
# Max pooling.
# --------------------------------------------------------------------------


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int]):
    """oneDNN's max pooling of NHWC x, as flax.linen.max_pool computes it (padding is never the maximum).

    Args:
      x: [N, H, W, C], float32 or bfloat16.
      window: (height, width).
      strides: (height, width).
      pads: (top, bottom, left, right).

    Returns:
      [N, OH, OW, C] in x's dtype. Its gradient sends each output's cotangent to
      the first maximum of its window, as XLA's select_and_scatter does.
    """
    if x.ndim != 4 or x.dtype not in DTYPES:
        raise TypeError(f"onednn max_pool takes float32 or bfloat16 NHWC, not {x.dtype}{list(x.shape)}.")
    x, pads = _crop_to_windows(x, window, strides, pads)
    return _max_pool(x, tuple(window), tuple(strides), pads)


def _pool_attrs(window, strides, pads) -> dict:
    as_array = lambda values: np.asarray(values, np.int64)  # noqa: E731
    return dict(window=as_array(window), strides=as_array(strides), pads=as_array(pads),
                threads=np.int64(threads_per_device()))  # fmt: skip


def _pool_workspace_bytes(x_shape, y_shape, dtype, window, strides, pads) -> int:
    """Bytes of oneDNN's forward-to-backward workspace per example."""
    (_, h, w, c), (_, oh, ow, _) = x_shape, y_shape
    bf16 = int(dtype == jnp.bfloat16)
    size = library().lb_max_pool_workspace_bytes(h, w, c, oh, ow, *window, *strides, *pads, bf16, threads_per_device())
    if size < 0:
        raise RuntimeError(f"oneDNN has no max pooling for {x_shape} {dtype} on this CPU.")
    return size


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    return _max_pool_forward(x, window, strides, pads)[0]


def _max_pool_forward(x, window, strides, pads):
    def run(x, sharded):
        oh, ow = _output_hw(x.shape, window, strides, pads)
        y = jax.ShapeDtypeStruct((x.shape[0], oh, ow, x.shape[3]), x.dtype)
        per_example = _pool_workspace_bytes(x.shape, y.shape, x.dtype, window, strides, pads)
        workspace = jax.ShapeDtypeStruct((x.shape[0], per_example), jnp.uint8)
        library()
        return tuple(jax.ffi.ffi_call("lb_max_pool_forward", (y, workspace))(x, **_pool_attrs(window, strides, pads)))

    y, workspace = _per_device(run, (x,), (), (BATCHED, BATCHED))
    return y, workspace


def _max_pool_backward(window, strides, pads, workspace, dy):
    def run(dy, workspace, sharded):
        n, oh, ow, c = dy.shape  # max_pool cropped x to what the windows cover, pads included:
        h, w = (
            (oh - 1) * strides[0] + window[0] - pads[0] - pads[1],
            (ow - 1) * strides[1] + window[1] - pads[2] - pads[3],
        )
        dx = jax.ShapeDtypeStruct((n, h, w, c), dy.dtype)
        return jax.ffi.ffi_call("lb_max_pool_backward", dx)(dy, workspace, **_pool_attrs(window, strides, pads))

    return (_per_device(run, (dy, workspace), (), BATCHED),)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)
