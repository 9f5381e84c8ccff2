"""Pure-torch references of every kernel's math: the test oracle, the CPU fallback, the documentation.

Each function here computes in the dtype it is given (tests call them in float64) and follows the same
casting rules as the matching Triton op.
"""
