"""`python -m vla_jax.serve`: serve a policy over HTTP (the implementation: vla_jax/policy/serve.py)."""

import sys

from vla_jax.policy.serve import build_parser, main  # noqa: F401  (the names users and tests import)

if __name__ == "__main__":
    sys.exit(main())
