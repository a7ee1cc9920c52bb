"""What an MPL step learns, and the EMA after it, copied: to tell whether a step changed them (the
non-finite skip tests, on the CPU and on a GPU)."""


def learned_state(step) -> dict:
    """Copies of each network's weights and BatchNorm running statistics and batch counts with
    its optimizer's momentum ("student", "teacher"), and of the feedback's baseline
    ("baseline")."""
    state = {name: [t.detach().clone() for t in net.state_dict().values()]
             + [s["momentum_buffer"].clone() for s in opt.state.values()]
             for name, net, opt in (("student", step.student, step.student_opt),
                                    ("teacher", step.teacher, step.teacher_opt))}
    state["baseline"] = [step.baseline.value.clone()]
    return state


def ema_state(ema) -> list:
    """Copies of a ModelEMA's weights, buffers and update count."""
    return [t.detach().clone() for t in ema.state_dict().values()]


def flat(state: dict) -> list:
    return [t for part in state.values() for t in part]
