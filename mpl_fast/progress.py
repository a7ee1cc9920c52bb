"""Progress of long work as lines on stderr (a log file reads them as well as a terminal).

Used by the trainer (evaluation, finetuning, stored logits) and by the data layer (indexing an
image tree), so it sits below both.
"""
import sys
import time


class ProgressLines:
    """`<what> <done>/<total> <unit>, <rate>/s, <s> s left[, detail]`: a line every `every`
    seconds and one at the end. silent_if_quick: no line at all for work done within `every`
    seconds (a step most runs pass in an instant, slow only at scale)."""

    def __init__(self, what, unit="images", every=5.0, silent_if_quick=False):
        self.what, self.unit, self.every = what, unit, every
        self.silent_if_quick, self.printed = silent_if_quick, False
        self.began = self.shown = time.monotonic()

    def __call__(self, done, total, detail=""):
        """detail: a few words to add at the end of the line (the latest loss, say)."""
        now = time.monotonic()
        if now - self.shown < self.every and (done < total or
                                              (self.silent_if_quick and not self.printed)):
            return
        rate = done / max(now - self.began, 1e-9)
        print(f"{self.what} {done}/{total} {self.unit}, {rate:.0f}/s, "
              f"{(total - done) / max(rate, 1e-9):.0f} s left" + (f", {detail}" if detail else ""),
              file=sys.stderr, flush=True)
        self.shown, self.printed = now, True
