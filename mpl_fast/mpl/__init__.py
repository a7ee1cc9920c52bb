"""The MPL algorithm: pseudo labels, losses, feedback estimators, the step, Reduced MPL.
No I/O, no logging, no argument parsing."""
