"""Finding the convolution that produced a CBN layer's input, in the input's autograd graph."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import ConvSpec

__all__ = ['in_backward', 'recomputing', 'find_conv', 'intercept_of']

# > 0 while find_conv reads a graph's saved tensors. Non-reentrant checkpointing keeps none: reading one recomputes
# the segment that produced it, there and then, so a CBN forward entered meanwhile is a recomputation.
_reading_saved = 0


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (a checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def recomputing() -> bool:
    """True for a forward that repeats an earlier one of this iteration: a checkpoint's recomputation during
    backward, or one that a layer's reading of its input's graph set off during the forward (non-reentrant
    checkpointing, two layers in one segment)."""
    return _reading_saved > 0 or torch._C._current_graph_task_id() != -1


def _leaf_parameter(node) -> Optional[Tensor]:
    """The leaf tensor behind a conv's weight/bias input, looking through autocast's dtype cast."""
    while node is not None:
        if hasattr(node, 'variable'):  # AccumulateGrad
            return node.variable
        if type(node).__name__ != 'ToCopyBackward0' or len(node.next_functions) != 1:
            return None
        node = node.next_functions[0][0]
    return None


def find_conv(x: Tensor) -> Tuple[Optional[ConvSpec], str]:
    """The 2D convolution that produced ``x``, read from its autograd node, or None and the reason why not.

    The kernel is the leaf parameter (fp32 even under autocast); a frozen or derived kernel is the tensor the
    convolution used. A frozen bias is constant: it gets no compensation term.
    """
    fn = x.grad_fn
    if fn is None:
        return None, 'its input has no autograd graph'
    if type(fn).__name__ == 'CompiledFunctionBackward':
        return None, ('its input comes out of a torch.compile graph, which hides the convolution (run the model '
                      'eagerly; in an mmengine config, remove compile)')
    if type(fn).__name__ != 'ConvolutionBackward0':
        return None, f'its input was produced by {type(fn).__name__}, not by a convolution'
    global _reading_saved
    _reading_saved += 1
    try:
        transposed, weight = fn._saved_transposed, fn._saved_weight
        inp = fn._saved_input
        stride, padding, dilation, groups = (fn._saved_stride, fn._saved_padding, fn._saved_dilation,
                                             fn._saved_groups)
        bias_sizes = fn._saved_bias_sym_sizes_opt  # None or (0,) without a bias, (C,) with one
        has_bias = bias_sizes is not None and len(bias_sizes) == 1 and int(bias_sizes[0]) > 0
    except (AttributeError, RuntimeError) as err:  # saved tensors freed, or a new torch layout
        return None, f'the convolution in its graph could not be read ({err})'
    finally:
        _reading_saved -= 1
    if transposed or weight.dim() != 4:
        return None, 'its input was produced by a transposed or non-2D convolution'
    kernel = _leaf_parameter(fn.next_functions[1][0])
    if kernel is None or kernel.shape != weight.shape:
        kernel = weight  # frozen or derived kernel: the tensor the conv used is theta
    bias = _leaf_parameter(fn.next_functions[2][0]) if has_bias else None  # frozen bias: constant, no term
    return ConvSpec(kernel, bias, inp, tuple(stride), tuple(padding), tuple(dilation), int(groups), has_bias), ''


def intercept_of(conv: ConvSpec) -> bool:
    """Whether the convolution adds a bias whose value is not in its graph (a frozen or derived bias): the window's
    mean then keeps an intercept per stored iteration, as the bias's value cannot be read."""
    return conv.has_bias and conv.bias is None
