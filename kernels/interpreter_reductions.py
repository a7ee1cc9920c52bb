"""Under Triton's interpreter (TRITON_INTERPRET=1: the CPU tests, debugging) a tl.reduce whose
combine function is not one of Triton's own (tl.max, tl.sum, argmax) is folded by calling that
function once an element, in Python: a 1000-class row took ~0.3 s where tl.sum takes a
millisecond. The loss kernels' joint reductions (softmax_common.max_max, max_sum_sum,
sum_sum_sum) reduce each operand on its own with a max or a sum, so under the interpreter they
are reduced with numpy instead. Compiled kernels are untouched; tests/test_interpreter_reductions.py
checks this path against the interpreter's own fold. With an interpreter this does not know, the
interpreter's own (slow, right) path stays."""
import numpy as np

REDUCERS = {"max": np.max, "sum": np.sum}


def install(joint):
    """joint: {combine function: ('max' | 'sum', ...) per operand}. Routes the interpreter's
    reductions with those combine functions through numpy (once; later calls add to the map)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    reduce_ops = getattr(interpreter, "ReduceOps", None)
    own = getattr(reduce_ops, "apply_impl", None)
    if own is None:
        return
    if getattr(own, "joint_reductions", None) is not None:
        own.joint_reductions.update(joint)
        return
    by_fn = dict(joint)

    def apply_impl(self, inputs):
        kinds = by_fn.get(self.combine_fn)
        if kinds is None or self.axis is None or len(inputs) != len(kinds):
            return own(self, inputs)
        return [self.to_tensor(REDUCERS[kind](arg.handle.data, axis=self.axis,
                                              keepdims=self.keep_dims), arg.dtype)
                for kind, arg in zip(kinds, inputs)]

    apply_impl.joint_reductions = by_fn
    apply_impl.interpreters_own = own
    reduce_ops.apply_impl = apply_impl


def interpreters_own():
    """The interpreter's own reduction (None if install() has not replaced it)."""
    from triton.runtime import interpreter

    return getattr(interpreter.ReduceOps.apply_impl, "interpreters_own", None)
