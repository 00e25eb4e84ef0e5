"""ResNet v1.5 for inference, NHWC, with analytic parameter, FLOP and byte counts.

The architecture is ResNet (He et al. 2016) as torchvision's `resnet{18,34,50,101,152}` and the Flax
ImageNet example build it. It uses the "v1.5" placement of a bottleneck's stride, on its 3x3 conv.
BatchNorm always uses its running statistics. So one example's output never depends on the others in
its batch. This is an inference model for latency measurements, not for training.

Letters in array names (models/__init__.py):

- B batch, V classes.
- I, J height and width, Z channels, U planes.
"""

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from models.dtypes import resolve_dtype

# depth -> (block kind, blocks per stage), as in torchvision's resnet constructors.
ARCHITECTURES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
IN_CHANNELS = 3
BN_EPSILON = 1e-5  # torchvision's and the Flax ImageNet example's value.
# Running mean and variance are float32 in nnx.BatchNorm whatever `param_dtype` says.
BN_STAT_ITEMSIZE = 4

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") for conv kernels.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """A ResNet's depth, classes, input size, width and dtypes.

    Stage widths are width, 2*width, 4*width and 8*width, times 4 after a bottleneck.
    `small_input` swaps the ImageNet stem for the CIFAR one, for 32x32 images. The ImageNet
    stem is a 7x7 stride-2 conv and a 3x3 stride-2 max pool. The CIFAR stem is a 3x3 stride-1
    conv with no pool. A bad field raises ValueError naming model.<field>.
    """

    depth: int = 50
    num_classes: int = 1000
    image_size: int = 224
    width: int = 64
    dtype: str = "float32"
    param_dtype: str = "float32"
    small_input: bool = False

    def __post_init__(self):
        if (
            not isinstance(self.depth, int)
            or isinstance(self.depth, bool)
            or self.depth not in ARCHITECTURES
        ):
            raise ValueError(
                f"model.depth must be one of {tuple(ARCHITECTURES)}, got {self.depth!r}"
            )
        for name in ("num_classes", "image_size", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.small_input, bool):
            raise ValueError(f"model.small_input must be a bool, got {self.small_input!r}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)


def _conv(cfg: ResNetConfig, cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # torchvision's explicit symmetric padding, not "SAME": for stride 2 on an even size
    # "SAME" pads only the bottom/right, which shifts every sampled window by one pixel.
    pad = (k - 1) // 2
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        kernel_init=_CONV_INIT,
        rngs=rngs,
    )


def _bn(cfg: ResNetConfig, c: int, rngs: nnx.Rngs, *, zero_scale: bool = False) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        c,
        use_running_average=True,
        momentum=0.9,
        epsilon=BN_EPSILON,
        dtype=resolve_dtype(cfg.dtype),
        param_dtype=resolve_dtype(cfg.param_dtype),
        # The last BN of each residual branch starts at zero (Goyal et al. 2017; the Flax
        # ImageNet example): every block starts as the identity, so activations of a freshly
        # built model do not grow with depth (without it their variance doubles per block).
        scale_init=nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init(),
        rngs=rngs,
    )


class BasicBlock(nnx.Module):
    """x_BxIxJxZ -> y_BxI'xJ'xU: a 3x3 conv of stride s, a 3x3 conv, plus the shortcut."""

    expansion = EXPANSION["basic"]

    def __init__(
        self, cfg: ResNetConfig, in_channels: int, planes: int, stride: int, *, rngs: nnx.Rngs
    ):
        out_channels = planes * self.expansion
        self.conv1 = _conv(cfg, in_channels, planes, 3, stride, rngs)
        self.bn1 = _bn(cfg, planes, rngs)
        self.conv2 = _conv(cfg, planes, out_channels, 3, 1, rngs)
        self.bn2 = _bn(cfg, out_channels, rngs, zero_scale=True)
        self.proj_conv, self.proj_bn = _projection(cfg, in_channels, out_channels, stride, rngs)

    def __call__(self, x_BxIxJxZ: jax.Array) -> jax.Array:
        y_BxIxJxU = jax.nn.relu(self.bn1(self.conv1(x_BxIxJxZ)))
        y_BxIxJxU = self.bn2(self.conv2(y_BxIxJxU))
        return jax.nn.relu(y_BxIxJxU + _shortcut(self, x_BxIxJxZ))


class Bottleneck(nnx.Module):
    """x_BxIxJxZ -> y_BxI'xJ'x4U through three convs plus the shortcut.

    A 1x1 conv goes to U planes, then a 3x3 conv has stride s. A last 1x1 conv goes to 4U.
    """

    expansion = EXPANSION["bottleneck"]

    def __init__(
        self, cfg: ResNetConfig, in_channels: int, planes: int, stride: int, *, rngs: nnx.Rngs
    ):
        out_channels = planes * self.expansion
        self.conv1 = _conv(cfg, in_channels, planes, 1, 1, rngs)
        self.bn1 = _bn(cfg, planes, rngs)
        self.conv2 = _conv(cfg, planes, planes, 3, stride, rngs)
        self.bn2 = _bn(cfg, planes, rngs)
        self.conv3 = _conv(cfg, planes, out_channels, 1, 1, rngs)
        self.bn3 = _bn(cfg, out_channels, rngs, zero_scale=True)
        self.proj_conv, self.proj_bn = _projection(cfg, in_channels, out_channels, stride, rngs)

    def __call__(self, x_BxIxJxZ: jax.Array) -> jax.Array:
        y_BxIxJxU = jax.nn.relu(self.bn1(self.conv1(x_BxIxJxZ)))
        y_BxIxJxU = jax.nn.relu(self.bn2(self.conv2(y_BxIxJxU)))
        y_BxIxJx4U = self.bn3(self.conv3(y_BxIxJxU))
        return jax.nn.relu(y_BxIxJx4U + _shortcut(self, x_BxIxJxZ))


def _projection(
    cfg: ResNetConfig, in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs
) -> tuple[nnx.Conv | None, nnx.BatchNorm | None]:
    """A 1x1 conv + BN shortcut where the block changes shape.

    Returns (None, None) where the shortcut is the identity.
    """
    if stride == 1 and in_channels == out_channels:
        return None, None
    return _conv(cfg, in_channels, out_channels, 1, stride, rngs), _bn(cfg, out_channels, rngs)


def _shortcut(block: BasicBlock | Bottleneck, x_BxIxJxZ: jax.Array) -> jax.Array:
    if block.proj_conv is None:
        return x_BxIxJxZ
    return block.proj_bn(block.proj_conv(x_BxIxJxZ))


class ResNet(nnx.Module):
    """Images [B, I, J, 3] -> logits_BxV, with BatchNorm in inference mode.

    Logits come out in `dtype`.
    """

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kind, blocks_per_stage = ARCHITECTURES[cfg.depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        stem_k, stem_stride = (3, 1) if cfg.small_input else (7, 2)
        self.stem_conv = _conv(cfg, IN_CHANNELS, cfg.width, stem_k, stem_stride, rngs)
        self.stem_bn = _bn(cfg, cfg.width, rngs)
        channels = cfg.width
        stages = []
        for i, num_blocks in enumerate(blocks_per_stage):
            planes = cfg.width * 2**i
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block_cls(cfg, channels, planes, stride, rngs=rngs))
                channels = planes * block_cls.expansion
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.fc = nnx.Linear(
            channels,
            cfg.num_classes,
            dtype=resolve_dtype(cfg.dtype),
            param_dtype=resolve_dtype(cfg.param_dtype),
            rngs=rngs,
        )

    def __call__(self, images_BxIxJx3: jax.Array) -> jax.Array:
        x_BxIxJxZ = jax.nn.relu(self.stem_bn(self.stem_conv(images_BxIxJx3)))
        if not self.cfg.small_input:
            # Padding with -inf (what max_pool pads with) matches torchvision's MaxPool2d(3, 2, 1).
            x_BxIxJxZ = nnx.max_pool(x_BxIxJxZ, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x_BxIxJxZ = block(x_BxIxJxZ)
        x_BxZ = jnp.mean(x_BxIxJxZ, axis=(1, 2))
        return self.fc(x_BxZ)


# ---------------------------------------------------------------------------------------------
# Analytic counts: pure arithmetic on the config, no arrays. They mirror the module above
# layer by layer; tests check them against the module's parameters and XLA's FLOP count.


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str  # the module path, e.g. "stages.0.1.conv2"
    kind: str
    k: int  # square window: kernel for conv, pool window; 1 for dense
    stride: int
    cin: int
    cout: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int


def _out_size(size: int, k: int, stride: int) -> int:
    pad = (k - 1) // 2
    return (size + 2 * pad - k) // stride + 1


def _layers(cfg: ResNetConfig) -> Iterator[_Layer]:
    """Every conv, pool and dense layer of ResNet(cfg) in execution order, per example."""

    def conv(name, k, stride, cin, cout, h, w, kind=None):
        ho, wo = _out_size(h, k, stride), _out_size(w, k, stride)
        return _Layer(name, kind or f"conv{k}x{k}", k, stride, cin, cout, h, w, ho, wo)

    kind, blocks_per_stage = ARCHITECTURES[cfg.depth]
    expansion = EXPANSION[kind]
    h = w = cfg.image_size
    stem = conv("stem_conv", *((3, 1) if cfg.small_input else (7, 2)), IN_CHANNELS, cfg.width, h, w)
    yield stem
    h, w, channels = stem.h_out, stem.w_out, cfg.width
    if not cfg.small_input:
        pool = conv("maxpool", 3, 2, channels, channels, h, w, kind="maxpool")
        yield pool
        h, w = pool.h_out, pool.w_out
    for i, num_blocks in enumerate(blocks_per_stage):
        planes = cfg.width * 2**i
        out_channels = planes * expansion
        for j in range(num_blocks):
            stride = 2 if i > 0 and j == 0 else 1
            prefix = f"stages.{i}.{j}."
            if kind == "basic":
                branch = [(3, stride, channels, planes), (3, 1, planes, out_channels)]
            else:
                branch = [(1, 1, channels, planes), (3, stride, planes, planes)]
                branch.append((1, 1, planes, out_channels))
            hb, wb = h, w
            for n, (k, s, cin, cout) in enumerate(branch, start=1):
                layer = conv(f"{prefix}conv{n}", k, s, cin, cout, hb, wb)
                yield layer
                hb, wb = layer.h_out, layer.w_out
            if stride != 1 or channels != out_channels:
                yield conv(f"{prefix}proj_conv", 1, stride, channels, out_channels, h, w)
            h, w, channels = hb, wb, out_channels
    yield _Layer("avgpool", "avgpool", h, 1, channels, channels, h, w, 1, 1)
    yield _Layer("fc", "dense", 1, 1, channels, cfg.num_classes, 1, 1, 1, 1)


def _params(layer: _Layer) -> int:
    """Trainable parameters of one layer.

    A conv has its kernel plus the BN scale and bias. A dense layer has weight and bias.
    """
    if layer.kind == "dense":
        return layer.cin * layer.cout + layer.cout
    if layer.kind.startswith("conv"):
        return layer.k * layer.k * layer.cin * layer.cout + 2 * layer.cout
    return 0


def num_params(cfg: ResNetConfig) -> int:
    """Trainable parameters (nnx.Param), counted from the config; BN running stats excluded."""
    return sum(_params(layer) for layer in _layers(cfg))


def layer_costs(cfg: ResNetConfig, batch: int) -> list[dict]:
    """Per-layer cost of one forward pass on `batch` images of cfg.image_size, in run order.

    There is one entry per conv ("conv7x7", "conv3x3", "conv1x1") and per pool ("maxpool",
    "avgpool"). The classifier ("dense") gets one too. XLA fuses the BatchNorm, ReLU and
    residual add after a conv into the conv. The counts do the same.

    - They get no entry of their own.
    - No FLOPs are counted for them, about 1% of the total for ResNet50.
    - The BN's four per-channel arrays count in the conv's weight bytes.

    Each entry has:

    - name: the module path ("stages.2.0.proj_conv"), or "maxpool" / "avgpool".
    - kind: one of the kinds above.
    - flops: 2 per multiply-accumulate, padded taps included. That is the torchvision /
      fvcore convention. A max pool counts one per window element compared. The average
      pool counts one add per input element.
    - params: trainable parameters (kernel, BN scale and bias; dense weight and bias).
    - weight_bytes: bytes of the layer's state in memory. That is the params in
      `param_dtype`, plus the BN running mean and variance. nnx.BatchNorm keeps those two
      in float32.
    - input_bytes, output_bytes: bytes of the activations read and written, in `dtype`.
    - out_shape: (batch, I, J, Z) of the output. It is (batch, Z) for avgpool and dense.
    - in_shape: (batch, I, J, Z) of the input.
    - window: (kernel, stride).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    act_bytes = resolve_dtype(cfg.dtype).itemsize
    param_bytes = resolve_dtype(cfg.param_dtype).itemsize
    costs = []
    for layer in _layers(cfg):
        outputs = batch * layer.h_out * layer.w_out * layer.cout
        inputs = batch * layer.h_in * layer.w_in * layer.cin
        weight_bytes = _params(layer) * param_bytes
        if layer.kind.startswith("conv"):
            flops = 2 * outputs * layer.k * layer.k * layer.cin
            weight_bytes += 2 * layer.cout * BN_STAT_ITEMSIZE
        elif layer.kind == "dense":
            flops = 2 * batch * layer.cin * layer.cout
        elif layer.kind == "maxpool":
            flops = outputs * layer.k * layer.k
        else:
            flops = inputs
        spatial = (layer.h_out, layer.w_out) if layer.kind.startswith(("conv", "max")) else ()
        costs.append(
            {
                "name": layer.name,
                "kind": layer.kind,
                "flops": flops,
                "params": _params(layer),
                "weight_bytes": weight_bytes,
                "input_bytes": inputs * act_bytes,
                "output_bytes": outputs * act_bytes,
                "out_shape": (batch, *spatial, layer.cout),
                "in_shape": (batch, layer.h_in, layer.w_in, layer.cin),
                "window": (layer.k, layer.stride),
            }
        )
    return costs


def model_costs(cfg: ResNetConfig, batch: int) -> dict[str, int]:
    """Totals of `layer_costs`: flops, bytes, weight_bytes and activation_bytes.

    The bytes are the weights read once plus every layer's activations in and out. They
    split into weight_bytes and activation_bytes.
    """
    costs = layer_costs(cfg, batch)
    weight_bytes = sum(c["weight_bytes"] for c in costs)
    activation_bytes = sum(c["input_bytes"] + c["output_bytes"] for c in costs)
    return {
        "flops": sum(c["flops"] for c in costs),
        "bytes": weight_bytes + activation_bytes,
        "weight_bytes": weight_bytes,
        "activation_bytes": activation_bytes,
    }


def arithmetic_intensity_by_kind(cfg: ResNetConfig, batch: int = 1) -> dict[str, float]:
    """FLOPs per byte of all layers of each kind together.

    The bytes are the weights plus the activations in and out.
    """
    flops: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for c in layer_costs(cfg, batch):
        flops[c["kind"]] = flops.get(c["kind"], 0) + c["flops"]
        moved = c["weight_bytes"] + c["input_bytes"] + c["output_bytes"]
        nbytes[c["kind"]] = nbytes.get(c["kind"], 0) + moved
    return {kind: flops[kind] / nbytes[kind] for kind in flops}
