"""Clipped per-unit gradient sum from one backward pass (book-keeping with mixed ghost norms).

DP-SGD needs, for per-example losses l_i grouped into privacy units u (a patient's images, or each
image alone; ``privacy.units``), the clipped sum

    S = sum_u c_u g_u,     g_u = sum_{i in u} grad l_i,     c_u = min(1, C / (||g_u|| + 1e-6)),

(Opacus' flat clipping, same constant). For a layer y = W a (convolution or linear, a unfolded to
T positions of d inputs, y with p outputs) example i's weight gradient is G_i^T A_i, with
G_i = dl_i/dy_i (T x p) and A_i (T x d). Book-keeping (Bu et al., ICML 2023) obtains every G_i from
a single backward pass that stops at the layer outputs -- the ordinary weight gradients, which
per-sample methods make redundant, are never computed -- and then per layer either

* materialises G_i^T A_i for every example and sums them per unit (cost T*d*p per example; a
  convolution as one grouped convolution, or through unfolded activations where T^2 <= d*p), or
* computes only the units' norms, ||sum_{i in u} G_i^T A_i||^2 = sum_{i,j in u} <A_i A_j^T, G_i G_j^T>
  ("ghost norm", cost T^2*(d+p) per pair i <= j of examples of one unit), keeps (A, G), and forms
  S = (diag(c_u(i)) G)^T A with one batched weight-gradient product once the c_u are known.

The choice is per layer and batch ("mixed" ghost clipping): ghost when the Gram products are much
cheaper than the per-example gradients, GHOST_RATIO * T^2 * pairs <= d*p * examples (with one image
per unit, pairs = examples: deep layers with few positions and many weights). Normalisation layers
and embeddings always materialise: their per-example gradients are small.

A unit with more images than one physical batch holds comes in pieces (``continues``): each piece's
summed gradient is added to a carried buffer of the model's size, and the unit's last piece clips
the whole sum. Noise, scaling and accounting stay Opacus'.

Under bf16 autocast (``training.precision``) each layer's activations and output gradients arrive
in bf16 and are upcast to the parameters' fp32 before anything above is computed: norms, clip
factors and S are fp32, and bf16 moves a unit across C only if its norm is within rounding of C.
Channels-last activations need nothing special (unfold and the weight-gradient products take any
memory layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import InputError
from privacy.per_sample import check_per_image

# Ghost norms when the Gram matrices (2*T^2 per example) are at least this much smaller than the
# per-example gradient (d*p): measured on ResNet9 at 224 px, 2 CPU threads, batch 32 of patients of
# 1-3 images, materialising is faster for layer3's convolutions (T=196, d*p=295k and 590k: 55 and 132 ms
# against 85 and 166 ms with ghost norms) and ghost norms for layer4's (T=49: 37 and 88 ms against 71
# and 170). A convolution materialises through unfold and one product per example where T^2 <= d*p
# (layer3: 55 ms against 75 ms as a grouped convolution), else as a grouped convolution (layer2's
# 3x3 convolutions at T=784: 25 and 49 ms against 58 and 106).
GHOST_RATIO = 16


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to ``callback``.

    Every tap also takes a shared scalar ``anchor``; differentiating the loss with respect to the
    anchor alone makes autograd visit every tap while skipping all parameter gradients.
    """

    @staticmethod
    def forward(ctx, output, anchor, callback):
        ctx.callback = callback
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback(grad)
        return grad, grad.new_zeros(()), None


class _Units:
    """How the examples of one physical batch form units: ``index[i]`` is example i's unit.

    ``summing``: the batch is a piece of one carried unit; only its summed gradient is needed.
    """

    def __init__(self, index: torch.Tensor, summing: bool, dtype: torch.dtype):
        self.index, self.summing = index, summing
        self.size = len(index)
        self.count = int(index.max()) + 1 if self.size else 0
        self.singletons = torch.equal(index, torch.arange(self.size, device=index.device))
        self.sq_norms = torch.zeros(self.count, dtype=dtype, device=index.device)
        # pairs i < j of one unit (the (i, j) and (j, i) terms of a squared norm are equal); the i = j
        # terms come from the batch as it is, without gathering copies of it
        self.pairs = (None if self.singletons else
                      torch.triu(index[:, None] == index[None, :], diagonal=1).nonzero(as_tuple=True))
        self.n_pairs = self.size + (0 if self.singletons else len(self.pairs[0]))

    def reduce(self, per_example: torch.Tensor) -> torch.Tensor:
        """Per-example tensors summed per unit."""
        if self.singletons:
            return per_example
        return per_example.new_zeros(self.count, *per_example.shape[1:]).index_add_(0, self.index, per_example)

    def add_ghost_norms(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Add ||sum_{i in u} g_i^T a_i||^2 = sum_{i in u} <a_i a_i^T, g_i g_i^T> + 2 sum_{i < j in u}
        <a_i a_j^T, g_i g_j^T> per unit, from a (B, T, d) and g (B, T, p)."""
        own = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).flatten(1).sum(1)
        if self.singletons:
            self.sq_norms += own
            return
        self.sq_norms.index_add_(0, self.index, own)
        i, j = self.pairs
        if len(i):
            cross = (torch.bmm(a[i], a[j].transpose(1, 2)) * torch.bmm(g[i], g[j].transpose(1, 2))).flatten(1).sum(1)
            self.sq_norms.index_add_(0, self.index[i], 2 * cross)


def saved_group_stats(output: torch.Tensor) -> list[torch.Tensor] | None:
    """(mean, rstd), each (B, G), that ATen's GroupNorm saved on ``output`` for its backward; None where
    the output came from another implementation (then they are recomputed)."""
    saved = [getattr(output.grad_fn, f"_saved_result{i}", None) for i in (1, 2)]
    return None if None in saved else [x.detach() for x in saved]


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise InputError("dp.grad_sample_mode bookkeeping: Conv2d padding='same' with an even kernel pads "
                         "asymmetrically, which is not supported; use hooks")
    return tuple(t // 2 for t in total)


def _sum_over(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x.sum(dims)``, where no dims means no sum (``Tensor.sum(())`` would reduce the batch too)."""
    return x.sum(dims) if dims else x


class _Layer:
    """One parametrised module: turns its output gradients into per-unit norms and the clipped sum."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.params = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        self.calls = 0  # forward passes recorded since the last backward (1 at most)
        self.fired = False  # the output gradient arrived
        self.activation = None
        # numeric padding for unfold/weight-gradient products; refuses unsupported 'same' at set-up
        self.padding = _conv_padding(module) if isinstance(module, nn.Conv2d) else None
        self.per_unit: dict[str, torch.Tensor] = {}
        self.ghost: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ghost_mode = False  # whether the last backward used ghost norms (for tests and benchmarks)
        self.group_stats = None  # a GroupNorm's (mean, rstd) as its forward pass saved them for autograd

    def positions(self, output: torch.Tensor) -> int | None:
        """T for an ungrouped convolution or a token-wise linear layer (ghost candidates), else None."""
        m = self.module
        if "weight" not in self.params:
            return None
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            return output.shape[2] * output.shape[3]
        if isinstance(m, nn.Linear) and output.dim() > 2:
            return math.prod(output.shape[1:-1])
        return None

    def backward(self, grad: torch.Tensor, units: _Units) -> None:
        """Add this layer's squared per-unit norms to ``units.sq_norms``; keep what S will need.

        Under autocast (``training.precision: bf16``) the activation and output gradient arrive in
        bf16; both are upcast to the parameters' dtype (fp32) first, so every norm, clip factor and
        weight-gradient product below is computed in fp32 (a no-op when they already match)."""
        a, self.activation = self.activation, None
        self.fired = True
        dtype = next(iter(self.params.values())).dtype
        grad = grad.to(dtype)
        a = a.to(dtype) if a.is_floating_point() else a  # an Embedding's input is indices
        if a.shape[0] != units.size or grad.shape[0] != units.size:
            raise InputError(f"dp.grad_sample_mode bookkeeping: layer {self.name} sees tensors of shapes "
                             f"{tuple(a.shape)} and {tuple(grad.shape)} in a batch of {units.size}: the batch must "
                             f"be dimension 0 of every layer's input and output")
        m = self.module
        t = self.positions(grad)
        # a carried piece needs only sums: the batched weight-gradient product gives them directly
        ghost = t is not None and (units.summing or GHOST_RATIO * t * t * units.n_pairs <= m.weight.numel() * units.size)
        self.ghost_mode = ghost
        if isinstance(m, nn.Conv2d):
            self._conv(a, grad, units, ghost)
        elif isinstance(m, nn.Linear):
            self._linear(a, grad, units, ghost)
        elif isinstance(m, nn.GroupNorm):
            self._group_norm(a, grad, units)
        elif isinstance(m, nn.LayerNorm):
            dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
            self._store("weight", _sum_over(grad * F.layer_norm(a, m.normalized_shape, eps=m.eps), dims), units)
            self._store("bias", _sum_over(grad, dims), units)
        else:  # Embedding: scatter each example's output gradients onto the rows it looked up
            b = a.shape[0]
            rows = a.reshape(b, -1)
            per = grad.new_zeros(b, m.num_embeddings, m.embedding_dim)
            per.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, m.embedding_dim), grad.reshape(b, -1, m.embedding_dim))
            self._store("weight", per, units)

    def _store(self, key: str, per_example: torch.Tensor, units: _Units) -> None:
        if key in self.params:
            per_unit = units.reduce(per_example)
            self.per_unit[key] = per_unit
            if not units.summing:
                units.sq_norms += per_unit.flatten(1).pow(2).sum(1)

    def _group_norm(self, a, g, units):
        """Per-example GroupNorm gradients dgamma_(i,c) = sum g * xhat and dbeta_(i,c) = sum g, from ATen's
        fused GroupNorm backward run on the batch as one example whose groups are every example's groups
        (the batch's mean and rstd, shape (B, G), are exactly those groups' statistics), with the statistics
        the forward pass saved: at 224 px materialising xhat and multiplying was the largest cost of
        fine-tuning norms and head."""
        m = self.module
        b, c, positions = a.shape[0], a.shape[1], a[0, 0].numel()
        stats, self.group_stats = self.group_stats, None
        if stats is None:
            _, *stats = torch.ops.aten.native_group_norm(a, None, None, b, c, positions, m.num_groups, m.eps)
        mean, rstd = (x.to(a.dtype) for x in stats)
        flat = (1, b * c, positions)
        _, weight, bias = torch.ops.aten.native_group_norm_backward(
            g.reshape(flat), a.reshape(flat), mean.view(1, -1), rstd.view(1, -1), a.new_ones(b * c), 1, b * c, positions,
            b * m.num_groups, [False, "weight" in self.params, "bias" in self.params])
        for key, per_example in (("weight", weight), ("bias", bias)):
            if per_example is not None:
                self._store(key, per_example.view(b, c), units)

    def _unfolded(self, a: torch.Tensor) -> torch.Tensor:
        """A convolution's input as (B, T, d): each output position's receptive field."""
        m = self.module
        return F.unfold(a, m.kernel_size, m.dilation, self.padding, m.stride).transpose(1, 2)

    def _conv(self, a, g, units, ghost):
        m = self.module
        b = a.shape[0]
        if ghost:
            if not units.summing:
                units.add_ghost_norms(self._unfolded(a), g.flatten(2).transpose(1, 2))
            self.ghost = (a, g)
        elif "weight" in self.params and m.groups == 1 and self.positions(g) ** 2 <= m.weight.numel():
            # few positions for the kernel's size: one (p x T)(T x d) product per example
            self._store("weight", torch.bmm(g.flatten(2), self._unfolded(a)).view(b, *m.weight.shape), units)
        elif "weight" in self.params:
            # all examples at once as one grouped convolution: example i is group i
            merged = torch.nn.grad.conv2d_weight(
                a.reshape(1, -1, *a.shape[2:]), (b * m.out_channels, m.in_channels // m.groups, *m.kernel_size),
                g.reshape(1, -1, *g.shape[2:]), m.stride, self.padding, m.dilation, b * m.groups)
            self._store("weight", merged.view(b, *m.weight.shape), units)
        self._store("bias", g.sum((2, 3)), units)

    def _linear(self, a, g, units, ghost):
        b = a.shape[0]
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # B, T, d and B, T, p
        if ghost:
            if not units.summing:
                units.add_ghost_norms(a3, g3)
            self.ghost = (a3, g3)
        else:
            self._store("weight", torch.bmm(g3.transpose(1, 2), a3), units)
        self._store("bias", g3.sum(1), units)

    def clipped_sum(self, unit_coef: torch.Tensor, example_coef: torch.Tensor) -> None:
        """Set ``p.grad`` = sum_u coef_u * (unit u's gradient); zero for a layer not used."""
        for key, p in self.params.items():
            if key in self.per_unit:
                p.grad = torch.tensordot(unit_coef.to(p.dtype), self.per_unit[key], dims=1).view_as(p)
            elif key == "weight" and self.ghost is not None:
                a, g = self.ghost
                scaled = g * example_coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
                m = self.module
                if isinstance(m, nn.Conv2d):
                    p.grad = torch.nn.grad.conv2d_weight(a, m.weight.shape, scaled, m.stride, self.padding,
                                                         m.dilation, m.groups)
                else:
                    p.grad = scaled.flatten(0, 1).t() @ a.flatten(0, 1)
            else:
                p.grad = torch.zeros_like(p)


class BookKeeping:
    """Computes the clipped per-unit gradient sum of a model into ``p.grad`` in one backward pass.

    Usage: ``clipper = BookKeeping(model, max_grad_norm)``, then per physical batch
    ``losses = criterion_none(model(x), y); clipper.backward(losses, units)``; ``p.grad`` then holds
    sum_u c_u g_u, what Opacus' ``DPOptimizerFastGradientClipping`` noises, scales and applies.
    Only training-mode forwards with gradients enabled are recorded.

    The model is refused (``InputError``) when the engine is built unless it treats every image of a
    batch on its own (``privacy.per_sample.check_per_image``): a module that mixes the batch, such as
    a BatchNorm even without parameters, would make one patient's gradient depend on the others' and
    break the per-patient bound C. The allow-list's parametrised layers are exactly those computed
    here. ``example_shape`` (one image, e.g. (1, H, W)): the batch-independence probe runs now on
    images of that shape, else on the model's first batch; ``reviewed``: the caller's own composite
    modules whose forward is per-image (the probe still checks them).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, example_shape: tuple[int, ...] | None = None,
                 reviewed: tuple[type, ...] = ()):
        check_per_image(model, example_shape, reviewed)
        self.max_grad_norm = max_grad_norm
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {name} pads with "
                                 f"'{module.padding_mode}'; only zero padding is supported")
            layer = _Layer(name, module)
            self.layers.append(layer)
            module.register_forward_hook(self._forward_hook(layer))
        self._anchor = None
        self._batch = None  # the batch size of the forward being recorded
        self._units = None
        self._carry: list[torch.Tensor] | None = None  # summed gradient of a unit that continues

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return None
            if self._anchor is None:
                self._anchor = torch.zeros((), device=output.device, requires_grad=True)
                self._batch = inputs[0].shape[0]
            if inputs[0].shape[0] != self._batch or output.shape[0] != self._batch:
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {layer.name} maps an input of shape "
                                 f"{tuple(inputs[0].shape)} to {tuple(output.shape)} in a batch of {self._batch}: "
                                 f"the batch must be dimension 0 of every layer's input and output")
            layer.calls += 1
            if layer.calls > 1:
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {layer.name} is used twice in one "
                                 f"forward pass (shared weights), which is not supported; use hooks")
            layer.activation = inputs[0].detach()
            if isinstance(module, nn.GroupNorm):
                layer.group_stats = saved_group_stats(output)
            return _Tap.apply(output, self._anchor, lambda g: layer.backward(g, self._units))
        return hook

    def _params(self) -> list[torch.Tensor]:
        return [p for layer in self.layers for p in layer.params.values()]

    def backward(self, per_example_losses: torch.Tensor, units: torch.Tensor | None = None,
                 continues: bool = False) -> torch.Tensor:
        """Set ``p.grad`` to the clipped sum over the batch's units; return the units' gradient norms
        (before clipping).

        ``units[i]`` is example i's unit (0, 1, ...; None: each example its own). ``continues``:
        the batch is a piece of one unit whose remaining images come in the next batch(es); its
        gradient is carried, ``p.grad`` is zero, and the unit is clipped with its last piece.
        """
        anchor, batch, self._anchor, self._batch = self._anchor, self._batch, None, None
        size = per_example_losses.shape[0]
        index = torch.arange(size) if units is None else torch.as_tensor(units, dtype=torch.long)
        carried = continues or self._carry is not None
        # squared norms in fp32 at least, whatever the losses' dtype (fp64 stays fp64)
        norm_dtype = torch.promote_types(per_example_losses.dtype, torch.float32)
        self._units = _Units(index.to(per_example_losses.device), carried, norm_dtype)
        try:
            if carried and self._units.count > 1:
                raise RuntimeError("bookkeeping: a batch that continues a unit must hold that unit alone")
            if size:
                if anchor is None:
                    raise RuntimeError("bookkeeping: no layer of the model was recorded in this forward pass "
                                       "(was the model run in eval mode, without gradients, or through a "
                                       "compiled graph made for another model?)")
                if size != batch or len(index) != size:
                    raise InputError(f"dp.grad_sample_mode bookkeeping: {size} per-example losses and {len(index)} "
                                     f"unit indices for a forward pass of {batch} examples")
                torch.autograd.grad(per_example_losses.sum(), anchor)
                silent = [layer.name for layer in self.layers if layer.calls and not layer.fired]
                if silent:  # a zero norm would clip nothing: refuse rather than under-clip
                    raise RuntimeError(f"bookkeeping: layers {', '.join(silent)} ran forward but got no gradient; "
                                       f"every recorded layer must reach the loss")
            if carried:
                return self._carry_piece(continues)
            norms = self._units.sq_norms.sqrt()
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping
            for layer in self.layers:
                layer.clipped_sum(coef, coef[self._units.index])
        finally:
            for layer in self.layers:
                layer.calls, layer.fired, layer.activation, layer.per_unit, layer.ghost = 0, False, None, {}, None
                layer.group_stats = None
            self._units = None
        return norms

    def _carry_piece(self, continues: bool) -> torch.Tensor:
        """Add the piece's sum to the carried unit; on its last piece, clip the unit into ``p.grad``."""
        ones = torch.ones(self._units.size, dtype=self._units.sq_norms.dtype, device=self._units.index.device)
        for layer in self.layers:
            layer.clipped_sum(ones[:1], ones)
        params = self._params()
        pieces = [p.grad for p in params]
        self._carry = pieces if self._carry is None else [c + g for c, g in zip(self._carry, pieces)]
        if continues:
            for p in params:
                p.grad = torch.zeros_like(p)
            return torch.zeros(0, device=ones.device)
        norm = torch.sqrt(sum(c.pow(2).sum() for c in self._carry))
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for p, c in zip(params, self._carry):
            p.grad = (c * coef.to(c.dtype)).view_as(p)
        self._carry = None
        return norm.view(1)
