"""Names of the request entries the Locust load test reports (rows of its CSV), in a module without Locust, so
tests and scripts read them without gevent's monkey-patching."""

from __future__ import annotations

TTFT_SUFFIX = " ttft"
E2E_SUFFIX = " e2e"

STREAM = "GenerateStream"  # reported twice: STREAM + TTFT_SUFFIX and STREAM + E2E_SUFFIX
UNARY = "Generate"
ROUTED = "Generate route"
HTTP_STREAM = "POST /v1/chat/completions stream"  # the OpenAI API; reported with both suffixes like STREAM
ADMIN_LOAD = "admin LoadAdapter"
ADMIN_REPLACE = "admin replace"
ADMIN_GENERATE = "admin Generate new version"
ADMIN_UNLOAD = "admin UnloadAdapter"

TTFT_NAMES = (STREAM + TTFT_SUFFIX, HTTP_STREAM + TTFT_SUFFIX)  # time-to-first-token samples, not calls
# generation calls (latency and throughput thresholds)
E2E_NAMES = (STREAM + E2E_SUFFIX, HTTP_STREAM + E2E_SUFFIX, UNARY, ROUTED)
