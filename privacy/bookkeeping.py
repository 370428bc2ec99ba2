"""Per-sample clipped gradient sum from one backward pass (book-keeping with mixed ghost norms).

DP-SGD needs, for a batch of per-example losses l_i, the clipped sum

    S = sum_i c_i * grad l_i,     c_i = min(1, C / (||grad l_i|| + 1e-6)),

(Opacus' flat clipping, same constant). For a layer y = W a (convolution or linear, a unfolded to
T positions of d inputs, y with p outputs) the per-example weight gradient is G_i^T A_i, with
G_i = dl_i/dy_i (T x p) and A_i (T x d). Book-keeping (Bu et al., ICML 2023) obtains every G_i from
a single backward pass that stops at the layer outputs -- the ordinary weight gradients, which
per-sample methods make redundant, are never computed -- and then per layer either

* materialises G_i^T A_i for every example (cost T*d*p per example, memory B*d*p), or
* computes only its norm, ||G_i^T A_i||^2 = <A_i A_i^T, G_i G_i^T> ("ghost norm", cost T^2*(d+p),
  memory 2*B*T^2), keeps (A, G), and forms S = (diag(c) G)^T A with one batched weight-gradient
  product once the c_i are known.

The choice is per layer ("mixed" ghost clipping): ghost when the two T x T Gram matrices are much
smaller than the per-example gradient (GHOST_RATIO * T^2 <= d*p), i.e. deep layers with few
positions and many weights. Normalisation layers (GroupNorm, LayerNorm) and embeddings always
materialise: their per-example gradients are small. Noise, sampling and accounting stay Opacus'.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config import InputError

# Ghost norms when the Gram matrices (2*T^2 per example) are at least this much smaller than the
# per-example gradient (d*p): measured on ResNet9 at 224 px, 2 CPU threads, materialising is faster
# for layer3's first convolution (T=196, d*p=295k) and ghost norms for the larger ones.
GHOST_RATIO = 8

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


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


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise InputError(f"dp.grad_sample_mode bookkeeping: Conv2d padding='same' with an even kernel pads "
                         f"asymmetrically, which is not supported; use hooks")
    return tuple(t // 2 for t in total)


class _Layer:
    """One parametrised module: decides ghost vs materialised and turns output gradients into S."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.params = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        self.calls = 0  # forward passes recorded since the last backward (1 at most)
        self.fired = False  # the output gradient arrived
        self.activation = None
        self.ghost_mode = False
        # numeric padding for unfold/weight-gradient products; refuses unsupported 'same' at set-up
        self.padding = _conv_padding(module) if isinstance(module, nn.Conv2d) else None
        self.per_sample: dict[str, torch.Tensor] = {}
        self.ghost: tuple[torch.Tensor, torch.Tensor] | None = None

    def use_ghost(self, activation: torch.Tensor, output: torch.Tensor) -> bool:
        """Ghost norm for an ungrouped convolution or a token-wise linear layer with few positions T."""
        m = self.module
        if "weight" not in self.params:
            return False
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            positions = output.shape[2] * output.shape[3]
        elif isinstance(m, nn.Linear) and activation.dim() > 2:
            positions = math.prod(output.shape[1:-1])
        else:
            return False
        return GHOST_RATIO * positions * positions <= m.weight.numel()

    def backward(self, grad: torch.Tensor, sq_norms: torch.Tensor) -> None:
        """Add this layer's squared per-example norms to ``sq_norms``; keep what S will need."""
        a, self.activation = self.activation, None
        self.fired = True
        m = self.module
        if isinstance(m, nn.Conv2d):
            self._conv(a, grad, sq_norms)
        elif isinstance(m, nn.Linear):
            self._linear(a, grad, sq_norms)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            if isinstance(m, nn.GroupNorm):
                normalised = F.group_norm(a, m.num_groups, eps=m.eps)
                dims = tuple(range(2, a.dim()))
            else:
                normalised = F.layer_norm(a, m.normalized_shape, eps=m.eps)
                dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
            self._store("weight", (grad * normalised).sum(dims), sq_norms)
            self._store("bias", grad.sum(dims), sq_norms)
        else:  # Embedding: scatter each example's output gradients onto the rows it looked up
            b = a.shape[0]
            rows = a.reshape(b, -1)
            per = grad.new_zeros(b, m.num_embeddings, m.embedding_dim)
            per.scatter_add_(1, rows.unsqueeze(-1).expand(-1, -1, m.embedding_dim), grad.reshape(b, -1, m.embedding_dim))
            self._store("weight", per, sq_norms)

    def _store(self, key: str, per_sample: torch.Tensor, sq_norms: torch.Tensor) -> None:
        if key in self.params:
            self.per_sample[key] = per_sample
            sq_norms += per_sample.flatten(1).pow(2).sum(1)

    def _conv(self, a, g, sq_norms):
        m = self.module
        b = a.shape[0]
        padding = self.padding
        if self.ghost_mode:
            unfolded = F.unfold(a, m.kernel_size, m.dilation, padding, m.stride)  # B, d, T
            flat = g.flatten(2)  # B, p, T
            gram_a = torch.bmm(unfolded.transpose(1, 2), unfolded)
            gram_g = torch.bmm(flat.transpose(1, 2), flat)
            sq_norms += (gram_a * gram_g).flatten(1).sum(1)
            self.ghost = (a, g)
        elif "weight" in self.params:
            # all examples at once as one grouped convolution: example i is group i
            merged = torch.nn.grad.conv2d_weight(
                a.reshape(1, -1, *a.shape[2:]), (b * m.out_channels, m.in_channels // m.groups, *m.kernel_size),
                g.reshape(1, -1, *g.shape[2:]), m.stride, padding, m.dilation, b * m.groups)
            self._store("weight", merged.view(b, *m.weight.shape), sq_norms)
        bias = g.sum((2, 3))
        self._store("bias", bias, sq_norms)

    def _linear(self, a, g, sq_norms):
        b = a.shape[0]
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])  # B, T, d and B, T, p
        if self.ghost_mode:
            sq_norms += (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).flatten(1).sum(1)
            self.ghost = (a3, g3)
        else:
            self._store("weight", torch.bmm(g3.transpose(1, 2), a3), sq_norms)
        self._store("bias", g3.sum(1), sq_norms)

    def clipped_sum(self, coef: torch.Tensor) -> None:
        """Set ``p.grad`` = sum_i coef_i * (per-example gradient i); zero for a layer not used."""
        for key, p in self.params.items():
            if key in self.per_sample:
                p.grad = torch.tensordot(coef.to(p.dtype), self.per_sample[key], dims=1).view_as(p)
            elif key == "weight" and self.ghost is not None:
                a, g = self.ghost
                scaled = g * coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
                m = self.module
                if isinstance(m, nn.Conv2d):
                    p.grad = torch.nn.grad.conv2d_weight(a, m.weight.shape, scaled, m.stride, self.padding,
                                                         m.dilation, m.groups)
                else:
                    p.grad = scaled.flatten(0, 1).t() @ a.flatten(0, 1)
            else:
                p.grad = torch.zeros_like(p)


class BookKeeping:
    """Computes the clipped per-example gradient sum of a model into ``p.grad`` in one backward pass.

    Usage: ``clipper = BookKeeping(model, max_grad_norm)``, then per physical batch
    ``losses = criterion_none(model(x), y); clipper.backward(losses)``; ``p.grad`` then holds
    sum_i c_i grad l_i, what Opacus' ``DPOptimizerFastGradientClipping`` noises, scales and applies.
    Only training-mode forwards with gradients enabled are recorded.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if not isinstance(module, SUPPORTED):
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {name or 'model'} "
                                 f"({type(module).__name__}) is not supported (supported: "
                                 f"{', '.join(t.__name__ for t in SUPPORTED)}); use hooks, ew or functorch")
            if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {name} pads with "
                                 f"'{module.padding_mode}'; only zero padding is supported")
            layer = _Layer(name, module)
            self.layers.append(layer)
            module.register_forward_hook(self._forward_hook(layer))
        self._anchor = None
        self._sq_norms = None

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return None
            if self._anchor is None:
                self._anchor = torch.zeros((), device=output.device, requires_grad=True)
            layer.calls += 1
            if layer.calls > 1:
                raise InputError(f"dp.grad_sample_mode bookkeeping: layer {layer.name} is used twice in one "
                                 f"forward pass (shared weights), which is not supported; use hooks")
            layer.activation = inputs[0].detach()
            layer.ghost_mode = layer.use_ghost(inputs[0], output)
            return _Tap.apply(output, self._anchor, lambda g: layer.backward(g, self._sq_norms))
        return hook

    def backward(self, per_example_losses: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` to the clipped sum; return the per-example gradient norms (before clipping)."""
        anchor, self._anchor = self._anchor, None
        self._sq_norms = per_example_losses.new_zeros(per_example_losses.shape[0])
        try:
            if len(per_example_losses):
                if anchor is None:
                    raise RuntimeError("bookkeeping: no layer of the model was recorded in this forward pass "
                                       "(was the model run in eval mode, without gradients, or through a "
                                       "compiled graph made for another model?)")
                torch.autograd.grad(per_example_losses.sum(), anchor)
                silent = [layer.name for layer in self.layers if layer.calls and not layer.fired]
                if silent:  # a zero norm would clip nothing: refuse rather than under-clip
                    raise RuntimeError(f"bookkeeping: layers {', '.join(silent)} ran forward but got no gradient; "
                                       f"every recorded layer must reach the loss")
            norms = self._sq_norms.sqrt()
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping
            for layer in self.layers:
                layer.clipped_sum(coef)
        finally:
            for layer in self.layers:
                layer.calls, layer.fired, layer.activation, layer.per_sample, layer.ghost = 0, False, None, {}, None
            self._sq_norms = None
        return norms
