"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3) (Lavin & Gray 2016), for XLA:CPU.

The U-Net's 3x3 'SAME' stride-1 convolutions (official nn.py `conv2d`) compute, per output pixel, a 3x3 window of
the input times the kernel, summed over input channels: 9 multiply-adds per output pixel and channel pair.
F(4x4, 3x3) computes a 4x4 block of outputs from the 6x6 input tile around it with 36 multiply-adds per channel
pair, 2.25 instead of 9 per output pixel:

    Y = A^T [ sum_c (G K_c G^T) * (B^T D_c B) ] A          (* elementwise over the 6x6 transformed tile)

D_c is the tile of input channel c, K_c the 3x3 kernel slice, and the sum over channels is, for each of the 36
positions of the transformed tile, one matmul [tiles, C_in] x [C_in, C_out]. B^T, G and A^T come from
Toom-Cook interpolation at the points 0, 1, -1, 2, -1/2 and infinity (`INPUT_TRANSFORM`, `KERNEL_TRANSFORM`,
`OUTPUT_TRANSFORM`); the points 2 and -1/2 in place of the usual 2 and -2 keep the float32 error at about
1/3 of the usual choice (~3e-6 against ~8e-6 of the largest output for 256 channels of unit-variance input).

Exact in exact arithmetic; in float32 the outputs and both gradients differ from a direct convolution by about
1e-5 of their largest value (a direct float32 convolution: ~1e-6), in float64 by ~1e-14. The gradients are
Winograd convolutions too (`conv3x3`'s custom VJP): the input gradient is the forward algorithm applied to the
output gradient with the kernel flipped and its channels swapped; the kernel gradient multiplies the
transformed input tiles with the output gradient taken through A's transpose, then takes G's transpose.

Where it pays: on XLA:CPU (jaxlib 0.10) for layers with many tiles and channels, e.g. the CIFAR-10 U-Net at
batch 32 (16x16 pixels with 256 channels: forward and both gradients in ~0.66x the time of XLA's convolution);
on small layers the 36 matmuls are too small and XLA's convolution is faster. `plan` says where.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

TILE = 4       # output pixels per tile side (the m of F(m x m, 3x3))
WINDOW = 6     # input pixels per tile side, m + 3 - 1

# B^T [6, 6], G [6, 3], A^T [4, 6]: Toom-Cook at 0, 1, -1, 2, -1/2, infinity. For any 1-D data d [6] and
# kernel k [3]: A^T ((G k) * (B^T d)) = [sum_j k[j] d[i + j] for i in 0..3] (tests/test_winograd.py checks it).
INPUT_TRANSFORM = np.array([
    [1, 3 / 2, -2, -3 / 2, 1, 0],
    [0, -1, -5 / 2, -1 / 2, 1, 0],
    [0, 1, 1 / 2, -5 / 2, 1, 0],
    [0, -1 / 2, -1, 1 / 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 1, 3 / 2, -2, -3 / 2, 1]])
KERNEL_TRANSFORM = np.array([
    [1, 0, 0],
    [-1 / 3, -1 / 3, -1 / 3],
    [1 / 3, -1 / 3, 1 / 3],
    [1 / 15, 2 / 15, 4 / 15],
    [-16 / 15, 8 / 15, -4 / 15],
    [0, 0, 1]])
OUTPUT_TRANSFORM = np.array([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -1 / 2, 0],
    [0, 1, 1, 4, 1 / 4, 0],
    [0, 1, -1, 8, -1 / 8, 1]])

GRADIENTS = ('winograd', 'xla')

# On XLA:CPU (2 cores) Winograd wins where each of its 36 matmuls is large, tiles * C_in * C_out multiply-adds:
# * >= 2**25 (batch 32 at 32x32 with 128 channels, at 16x16 with 256): forward and both gradients by Winograd in
#   0.80x and 0.66x the time of XLA's convolution;
# * >= 2**23 (batch 8 at 16x16 with 256 channels or at 32x32 with 128, batch 32 at 8x8): there Winograd's
#   gradients are slower (1.1-2x) but its forward is not (0.5-0.9x): forward by Winograd, gradients by XLA's
#   convolutions, 0.82-0.96x;
# * below (4x4 and 8x8 at batch 8): XLA's convolution (Winograd's forward 1.3-1.7x slower).
MIN_MATMUL_SIZE = 2 ** 25
MIN_FORWARD_MATMUL_SIZE = 2 ** 23


def _combine(coefficients, parts):
    """sum_i coefficients[i] * parts[i], skipping zero coefficients (the transforms are sparse); in the parts' dtype
    (the coefficients are Python floats, weakly typed, so float32 stays float32 under jax_enable_x64 too)."""
    total = None
    for coefficient, part in zip(coefficients, parts):
        coefficient = float(coefficient)
        if coefficient == 0:
            continue
        term = part if coefficient == 1 else -part if coefficient == -1 else part * coefficient
        total = term if total is None else total + term
    return total


def _along(matrix: np.ndarray, x: jax.Array, axis: int) -> jax.Array:
    """matrix [m, n] applied along `axis` of x (length n) -> x with that axis of length m; each entry a sparse sum
    of slices of x (`_combine`), which XLA fuses into one loop."""
    parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
    return jnp.stack([_combine(row, parts) for row in matrix], axis=axis)


def _strided_taps(x: jax.Array, axis: int, count: int, length: int) -> list[jax.Array]:
    """The `count` slices x[i : i + length : TILE] along `axis` (length / TILE entries each), i = 0 .. count - 1."""
    return [jax.lax.slice_in_dim(x, i, i + length - TILE + 1, TILE, axis) for i in range(count)]


def input_tiles(x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] (H, W multiples of 4) -> B^T D B for every 6x6 tile of x padded by 1: [36, B*H*W/16, C].

    Two passes, rows then columns; each keeps XLA's fused loops to reading every input element a few times.
    """
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = _strided_taps(padded, 1, WINDOW, height)                                  # 6 x [B, H/4, W+2, C]
    by_rows = jnp.stack([_combine(INPUT_TRANSFORM[a], rows) for a in range(WINDOW)])  # [6, B, H/4, W+2, C]
    columns = _strided_taps(by_rows, 3, WINDOW, width)                               # 6 x [6, B, H/4, W/4, C]
    tiles = jnp.stack([_combine(INPUT_TRANSFORM[b], columns) for b in range(WINDOW)], axis=1)
    return tiles.reshape(WINDOW * WINDOW, batch * (height // TILE) * (width // TILE), channels)


def kernel_tiles(kernel: jax.Array) -> jax.Array:
    """kernel: [3, 3, C_in, C_out] -> G K G^T: [36, C_in, C_out]."""
    tiles = _along(KERNEL_TRANSFORM, _along(KERNEL_TRANSFORM, kernel, 0), 1)   # [6, 6, C_in, C_out]
    return tiles.reshape(WINDOW * WINDOW, *kernel.shape[2:])


def kernel_from_tiles(tiles_grad: jax.Array) -> jax.Array:
    """Transpose of `kernel_tiles`: [36, C_in, C_out] -> G^T dU G: [3, 3, C_in, C_out]."""
    tiles_grad = tiles_grad.reshape(WINDOW, WINDOW, *tiles_grad.shape[1:])
    return _along(KERNEL_TRANSFORM.T, _along(KERNEL_TRANSFORM.T, tiles_grad, 0), 1)


def output_from_tiles(products: jax.Array, batch: int, height: int, width: int) -> jax.Array:
    """products: [36, B*H*W/16, C] -> A^T M A, each tile's 4x4 outputs put in place: [B, H, W, C]."""
    channels = products.shape[-1]
    products = products.reshape(WINDOW, WINDOW, batch, height // TILE, width // TILE, channels)
    out = _along(OUTPUT_TRANSFORM, _along(OUTPUT_TRANSFORM, products, 0), 1)     # [4, 4, B, H/4, W/4, C]
    return jnp.transpose(out, (2, 3, 0, 4, 1, 5)).reshape(batch, height, width, channels)


def output_tiles_transposed(out_grad: jax.Array) -> jax.Array:
    """Transpose of `output_from_tiles`: out_grad [B, H, W, C] -> A dY A^T per tile: [36, B*H*W/16, C]."""
    batch, height, width, channels = out_grad.shape
    blocks = out_grad.reshape(batch, height // TILE, TILE, width // TILE, TILE, channels)
    tiles = _along(OUTPUT_TRANSFORM.T, _along(OUTPUT_TRANSFORM.T, blocks, 2), 4)  # [B, H/4, 6, W/4, 6, C]
    return jnp.transpose(tiles, (2, 4, 0, 1, 3, 5)).reshape(WINDOW * WINDOW, -1, channels)


# The two programs below are jitted so that each distinct shape is traced once per process: written out, one
# convolution and its gradients are ~1,000 small operations, and tracing them again for every layer of the
# CIFAR-10 train step added ~2.5 s to every start, cache warm or not. XLA inlines them when it compiles.
@jax.jit
def _conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    products = jnp.einsum('ptc,pco->pto', input_tiles(x), kernel_tiles(kernel))
    return output_from_tiles(products, batch, height, width)


@jax.jit
def _kernel_gradient(x: jax.Array, out_grad: jax.Array) -> jax.Array:
    """d/dkernel of sum(out_grad * conv3x3(x, kernel)): [3, 3, C_in, C_out]."""
    tiles_grad = jnp.einsum('ptc,pto->pco', input_tiles(x), output_tiles_transposed(out_grad))
    return kernel_from_tiles(tiles_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, kernel: jax.Array, gradients: str = 'winograd') -> jax.Array:
    """The 3x3 'SAME' stride-1 convolution (cross-correlation, NHWC / HWIO) of x [B, H, W, C_in] with kernel
    [3, 3, C_in, C_out] -> [B, H, W, C_out], by F(4x4, 3x3). H and W must be multiples of 4; x and kernel of
    one floating dtype. `gradients`: 'winograd' computes both gradients by Winograd too, 'xla' by XLA's
    convolutions (faster where the layer is small: `plan`)."""
    _check_operands(x, kernel, gradients)
    return _conv3x3_forward(x, kernel)


def _check_operands(x: jax.Array, kernel: jax.Array, gradients: str) -> None:
    _, height, width, channels = x.shape
    if height % TILE or width % TILE:
        raise ValueError(f'conv3x3 needs H and W divisible by {TILE}, got x of shape {x.shape}')
    if kernel.shape[:3] != (3, 3, channels):
        raise ValueError(f'conv3x3 needs a [3, 3, {channels}, C_out] kernel for x of shape {x.shape}, '
                         f'got {kernel.shape}')
    if gradients not in GRADIENTS:
        raise ValueError(f'conv3x3: gradients={gradients!r}; allowed: {GRADIENTS}')


def _conv3x3_fwd(x, kernel, gradients):
    _check_operands(x, kernel, gradients)
    return _conv3x3_forward(x, kernel), (x, kernel)


def _xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv3x3_bwd(gradients, residuals, out_grad):
    x, kernel = residuals
    if gradients == 'xla':
        return jax.vjp(_xla_conv, x, kernel)[1](out_grad)
    # d/dx: the correlation of out_grad with the kernel rotated by 180 degrees, channels swapped.
    x_grad = _conv3x3_forward(out_grad, jnp.swapaxes(kernel[::-1, ::-1], 2, 3))
    return x_grad, _kernel_gradient(x, out_grad)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def plan(algorithm: str, x_shape: tuple, kernel_shape: tuple, dtype, platform: str) -> str | None:
    """How a 3x3 stride-1 'SAME' convolution of x [B, H, W, C_in] with kernel [3, 3, C_in, C_out] runs under
    config.model.conv3x3 = `algorithm` ('xla', 'winograd' or 'auto') on `platform`: None for XLA's convolution,
    else the `gradients` argument of `conv3x3` ('winograd' or 'xla').

    'winograd': Winograd (gradients too) wherever the shapes allow it (H, W multiples of 4, float32 or float64).
    'auto': only on CPU, in float32 or float64, by the size of each of the 36 matmuls (tiles * C_in * C_out
    multiply-adds): >= MIN_MATMUL_SIZE Winograd with Winograd gradients, >= MIN_FORWARD_MATMUL_SIZE Winograd
    with XLA's gradients, below that XLA's convolution.
    bfloat16 never: its rounding error, amplified by the transforms, would be ~1e-2.
    """
    batch, height, width, channels = x_shape
    if algorithm == 'xla' or height % TILE or width % TILE or tuple(kernel_shape[:2]) != (3, 3):
        return None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return None
    if algorithm == 'winograd':
        return 'winograd'
    size = batch * (height // TILE) * (width // TILE) * channels * kernel_shape[-1]
    if platform != 'cpu' or size < MIN_FORWARD_MATMUL_SIZE:
        return None
    return 'winograd' if size >= MIN_MATMUL_SIZE else 'xla'
