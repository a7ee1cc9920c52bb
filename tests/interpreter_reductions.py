"""Test-suite speed: Triton's interpreter reduces a tl.reduce whose combine function is not one
of its own (tl.max, tl.sum, argmax) by calling that function once an element, in Python: a
1000-class row took ~0.3 s where tl.sum takes a millisecond. The loss kernels' joint
reductions (softmax_common.max_max, max_sum_sum, sum_sum_sum) reduce each operand on its own,
with a max or a sum, so under the interpreter they are reduced with numpy here. The compiled
kernels are untouched (this runs only with TRITON_INTERPRET=1), and
tests/test_loss_ops.py checks the numpy path against the interpreter's own element-by-element
one."""
import numpy as np

# what each joint reduction does to its operands, in order
JOINT = {"max_max": (np.max, np.max), "max_sum_sum": (np.max, np.sum, np.sum),
         "sum_sum_sum": (np.sum, np.sum, np.sum)}


def install():
    """Route the interpreter's reductions with our combine functions through numpy; returns
    the interpreter's own apply_impl (None where this triton has no such interpreter)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    from mpl_fast.kernels import softmax_common

    reduce_ops = getattr(interpreter, "ReduceOps", None)
    if reduce_ops is None or not hasattr(reduce_ops, "apply_impl"):
        return None  # another interpreter: its own path, slow but right
    own = reduce_ops.apply_impl
    if getattr(own, "joint_reductions", False):
        return own.interpreters_own
    by_fn = {getattr(softmax_common, name): fns for name, fns in JOINT.items()}

    def apply_impl(self, inputs):
        fns = by_fn.get(self.combine_fn)
        if fns is None or self.axis is None or len(inputs) != len(fns):
            return own(self, inputs)
        return [self.to_tensor(fn(arg.handle.data, axis=self.axis, keepdims=self.keep_dims),
                               arg.dtype) for fn, arg in zip(fns, inputs)]

    apply_impl.joint_reductions = True
    apply_impl.interpreters_own = own
    reduce_ops.apply_impl = apply_impl
    return own
