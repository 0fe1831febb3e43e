"""Leaner autograd for Llama-family decoder blocks: the same forward values, fewer saved activations.

Autograd keeps every intermediate that some op needs in backward. Per token and layer of a Llama block
that includes, besides what attention needs, for each of the two RMSNorms its normalised input and its
output (which the projections after it keep for their weight gradients), and in the SwiGLU MLP
down(silu(gate) * up(x)) the intermediate-size vectors up, silu(gate) and silu(gate) * up. Here a norm
saves only its input, its output is rebuilt from that input when a projection's backward asks for it (a
saved-tensor hook), and the MLP saves gate only, recomputing up(x) (one matmul, ~6% of a step's
FLOPs) and the elementwise rest in backward, as Liger Kernel's fused RMSNorm / SwiGLU do on GPUs. On
SmolLM2-135M, for 16 x 64 tokens, a layer then saves 16.5 MiB instead of ~44 MiB. Forward values are
bit-identical to transformers' modules; gradients agree to float rounding (tests/test_lean.py).

`apply(model)` swaps the forward of the modules it recognises (by class, not by shape: Gemma's RMSNorm
multiplies by 1 + weight, and must not match) and leaves everything else alone.
"""

from __future__ import annotations

import ctypes
import functools
import types
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# Modules whose forward is exactly transformers' LlamaRMSNorm / LlamaMLP (silu activation), and the
# decoder layers that hold them.
DECODER_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
SILU = {"SiLU", "SiLUActivation"}  # torch's and transformers' (both F.silu)


class _RMSNorm(torch.autograd.Function):
    """y = weight * (x / rms(x)), saving x and 1 / rms(x) only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # The same ops in the same order as LlamaRMSNorm.forward, so the values are bit-identical.
        rstd = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return _RMSNorm.output(x, weight, rstd)

    @staticmethod
    def output(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        return weight * (x.to(torch.float32) * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ctx.rebuilt = None  # the projections after this norm are done with its rebuilt output (_unpack)
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        # d(x_i r)/dx_j with r = (mean(x^2) + eps)^-1/2: r (delta_ij - xhat_i xhat_j / H), so
        # grad_x = r (g - xhat * mean(g * xhat)) for g the gradient w.r.t. the normalised x. In place on
        # fresh tensors: on a CPU every new activation-sized tensor costs page faults.
        g = (grad_out * weight).to(torch.float32)
        mean = (g * normed).mean(-1, keepdim=True)
        grad_x = g.sub_(normed.mul_(mean)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLU(torch.autograd.Function):
    """y = down(silu(gate) * up(x)), saving x and gate only: up(x) (one matmul) and silu(gate) * up are
    recomputed in backward. x is a norm's output, which the saved-tensor hook below does not keep either."""

    @staticmethod
    def forward(ctx, x, gate, up_weight, up_bias, down_weight, down_bias):
        ctx.save_for_backward(x, gate, up_weight, up_bias, down_weight)
        ctx.has_down_bias = down_bias is not None
        return F.linear(F.silu(gate) * F.linear(x, up_weight, up_bias), down_weight, down_bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate, up_weight, up_bias, down_weight = ctx.saved_tensors
        up = F.linear(x, up_weight, up_bias)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_down_weight = grad_down_bias = grad_x = grad_up_weight = grad_up_bias = None
        if ctx.needs_input_grad[4]:
            grad_down_weight = flat_out.t().matmul((silu * up).reshape(-1, up.shape[-1]))
        if ctx.has_down_bias and ctx.needs_input_grad[5]:
            grad_down_bias = flat_out.sum(0)
        grad_act = grad_out.matmul(down_weight)  # w.r.t. silu(gate) * up
        grad_up = grad_act * silu
        # silu'(g) = sig(g) (1 + g (1 - sig(g))) = sig (1 + g - silu), built in silu's buffer and
        # grad_gate in grad_act's: fewer fresh intermediate-size tensors (page faults on a CPU).
        grad_gate = grad_act.mul_(up).mul_(silu.neg_().add_(gate).add_(1).mul_(sig))
        flat_up = grad_up.reshape(-1, grad_up.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_up.matmul(up_weight)
        if ctx.needs_input_grad[2]:
            grad_up_weight = flat_up.t().matmul(x.reshape(-1, x.shape[-1]))
        if up_bias is not None and ctx.needs_input_grad[3]:
            grad_up_bias = flat_up.sum(0)
        return grad_x, grad_gate, grad_up_weight, grad_up_bias, grad_down_weight, grad_down_bias


class _NormOutput(NamedTuple):
    """A saved view of a lean RMSNorm's output, kept as the norm's backward node plus the view's layout."""

    node: Any
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


def _pack(saved: torch.Tensor) -> torch.Tensor | _NormOutput:
    # The projections after a norm (q/k/v, gate/up) save its output, as a 2-D view, for their weight
    # gradients. The norm's own node already holds x and 1 / rms(x), so keep a recipe, not the tensor.
    base = saved._base if saved._is_view() else saved
    if not isinstance(base.grad_fn, _RMSNorm._backward_cls):
        return saved
    return _NormOutput(base.grad_fn, saved.shape, saved.stride(), saved.storage_offset())


def _unpack(saved: torch.Tensor | _NormOutput) -> torch.Tensor:
    if not isinstance(saved, _NormOutput):
        return saved
    # The projections' backward runs before the norm's, so the norm's saved tensors are still there.
    # Rebuilt once per norm for all of them (q, k and v; gate and up), kept on the norm's node until
    # the norm's own backward drops it.
    node = saved.node
    if getattr(node, "rebuilt", None) is None:
        x, weight, rstd = node.saved_tensors
        node.rebuilt = _RMSNorm.output(x, weight, rstd)
    return node.rebuilt.as_strided(saved.shape, saved.stride, saved.offset)


def _decoder_layer_call(forward, trim_heap: bool, *args, **kwargs) -> torch.Tensor:
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        out = forward(*args, **kwargs)
    if trim_heap and out.requires_grad:
        # Every layer leaves freed blocks in holes between the activations it keeps; glibc would keep
        # them all resident until the step's end. Hand them back here, in forward and in backward.
        release_free_heap()
        out.register_hook(_trim_in_backward)
    return out


def _trim_in_backward(grad: torch.Tensor) -> None:
    release_free_heap()


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    up, down = self.up_proj, self.down_proj
    return _SwiGLU.apply(x, self.gate_proj(x), up.weight, up.bias, down.weight, down.bias)


# `lean_memory=auto` turns on from this many parameters: below it the Python-side cost of the custom
# backward (~0.3 ms per module call) outweighs memory that a toy model does not need.
AUTO_MIN_PARAMETERS = 50_000_000


# With `trim_heap`, every this many decoder layers hand freed heap pages back. Each trim makes the pages
# that the next layers reuse fault in anew: trimming after every layer cost ~1 s per SmolLM2 step (of
# ~8.5); every 4th keeps the same peak (measured: 3,264-3,312 vs 3,289 MiB) for a fraction of that.
TRIM_EVERY_LAYERS = 4


def wanted(setting: str, model: torch.nn.Module, *, checkpointing: bool = False) -> bool:
    """Whether `trainer.lean_memory` (auto | on | off) applies to `model`. Under gradient checkpointing
    (`checkpointing`) a decoder layer keeps only its input for backward, so the lean layers would save
    nothing more and only add their recomputation: auto is off then (on still composes: the same gradients,
    tests/test_precision.py)."""
    if setting == "auto":
        return not checkpointing and sum(p.numel() for p in model.parameters()) >= AUTO_MIN_PARAMETERS
    return setting == "on"


def apply(model: torch.nn.Module, *, trim_heap: bool = False) -> int:
    """Give the recognised RMSNorm and SwiGLU MLP modules of `model` the lean forward; how many changed.

    An MLP is changed only if its up and down projections are plain `nn.Linear`s (an adapter such as LoRA
    in their place must see its own forward) and its activation is silu. Inside a recognised decoder layer the
    norms' outputs are not saved either: the projections after them rebuild them in backward.
    `trim_heap`: return freed heap pages to the OS after every 4th layer's forward and backward (CPU runs).
    """
    changed, layers = 0, 0
    for module in model.modules():
        name = type(module).__name__
        if name in DECODER_LAYERS:
            trim = trim_heap and layers % TRIM_EVERY_LAYERS == 0
            call = functools.partial(_decoder_layer_call, module.forward, trim)
            module.forward = functools.update_wrapper(call, module.forward)
            layers += 1
        elif name in RMS_NORMS:
            module.forward = types.MethodType(_rms_norm_forward, module)
            changed += 1
        elif (
            name in SWIGLU_MLPS
            and type(module.up_proj) is torch.nn.Linear
            and type(module.down_proj) is torch.nn.Linear
            and type(module.act_fn).__name__ in SILU
        ):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    if not changed:
        print(
            f"lean: {type(model).__name__} has no Llama-family RMSNorm or SwiGLU MLP; its layers run as "
            "transformers wrote them (trainer.lean_memory has no effect)"
        )
    return changed


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere).

    On a CPU every layer mallocs and frees its scratch tensors between the activations it keeps. glibc
    keeps freed pages resident for reuse, and pages in holes between live blocks are never returned, so
    without this a step's resident memory grows by every layer's leftovers (SmolLM2, 16 x 64 tokens:
    ~13 MiB a layer, from RSS sampled every 2 ms through a step). Costs a heap walk (~1 ms) and
    re-faulting the pages when they are used again: the previous step's freed gradients among them,
    which is why `trainer.heap_trim` is off unless memory binds.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
