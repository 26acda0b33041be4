"""`fastdiff bench`: providers.py (the one provider vocabulary), timing.py (the one timer), report.py (the one
table and JSON writer), e2e.py / ops.py / native.py (the rows), suite.py (the plan and the command)."""

# The presets of the CPU runs and of the diffusers comparison: digits and the 28x28 real-MNIST network.
PRESETS = ("digits", "mnist5k")
