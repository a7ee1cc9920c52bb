"""What an MPL step learns, copied: to tell whether a step changed it (the non-finite skip tests,
on the CPU and on a GPU)."""


def learned_state(step) -> dict:
    """Copies of each network's weights and BatchNorm running statistics with its optimizer's
    momentum ("student", "teacher"), and of the feedback's baseline ("baseline")."""
    state = {name: [t.detach().clone() for t in net.state_dict().values()
                    if t.is_floating_point()]
             + [s["momentum_buffer"].clone() for s in opt.state.values()]
             for name, net, opt in (("student", step.student, step.student_opt),
                                    ("teacher", step.teacher, step.teacher_opt))}
    state["baseline"] = [step.baseline.value.clone()]
    return state


def flat(state: dict) -> list:
    return [t for part in state.values() for t in part]
