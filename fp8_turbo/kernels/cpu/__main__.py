"""`python -m fp8_turbo.kernels.cpu --build`: compile the CPU kernels now (scripts/setup_env.sh does this), so
the first engine start or test does not wait for the compiler."""
import argparse
import logging
import sys

from fp8_turbo.kernels.cpu import attention, gemm, ops, step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", action="store_true", help="build (or find) the extensions and report")
    p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not gemm.available():
        print("CPU kernels: not available (see the warning above); the torch reference path will be used")
        return 0  # not an error: the engine falls back
    print(f"CPU kernels: built; instruction sets {', '.join(gemm.supported_isas())} (running {gemm.ISAS[gemm.selected_isa()]})")
    for name, module in (("attention", attention), ("fused small-op", ops)):
        if not module.available():
            print(f"CPU {name} kernels: not available (see the warning above); the torch code will be used")
    if step.enabled() and step.extension() is None:
        print("CPU native step: not available (see the warning above); the model's modules will run each op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
