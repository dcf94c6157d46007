"""pdroute: disaggregated LLM serving on Kubernetes.

Kept import-free on purpose: ``epp`` and ``vllm_sidecar`` import the shared
protocol modules under ``pdroute.protocol`` and must not pull in the CLI.
"""

__version__ = "0.1.0"
