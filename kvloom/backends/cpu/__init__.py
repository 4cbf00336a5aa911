"""kvloom's CPU backend: cpu_kernels.c, its build (build.py: standard library only, so the CLI can start
a first start's compile before torch is imported) and its ctypes bindings (kernels.py). This package's
init imports nothing, for the same reason."""
