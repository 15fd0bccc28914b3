"""The Prometheus metrics of docs/metrics.md, in one registry that the engine and the server update
and the side port (--metrics-port) exposes."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only double what scrapers already know
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

REQUESTS = Counter("mistral_grpc_requests", "RPCs finished, by method and gRPC status code name",
                   ["rpc", "code"], registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram("mistral_grpc_time_to_first_token_seconds",
                                "Seconds from a request's arrival to its first generated token",
                                buckets=_LATENCY_BUCKETS, registry=REGISTRY)
INTER_TOKEN_LATENCY = Histogram("mistral_grpc_inter_token_latency_seconds",
                                "Seconds between consecutive generated tokens of one sequence",
                                buckets=_LATENCY_BUCKETS, registry=REGISTRY)
REQUEST_DURATION = Histogram("mistral_grpc_request_duration_seconds", "Seconds an RPC took, end to end",
                             ["rpc"], buckets=_DURATION_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("mistral_grpc_prompt_tokens", "Prompt tokens admitted", registry=REGISTRY)
GENERATION_TOKENS = Counter("mistral_grpc_generation_tokens", "Tokens generated", registry=REGISTRY)
RUNNING_REQUESTS = Gauge("mistral_grpc_running_requests", "Requests with sequences in the running batch",
                         registry=REGISTRY)
WAITING_REQUESTS = Gauge("mistral_grpc_waiting_requests", "Requests queued, not yet running", registry=REGISTRY)
# What an operator needs to read the ones above.
HELD_REQUESTS = Gauge("mistral_grpc_held_requests",
                      "Streams paused because their client stopped reading (not counted as running or waiting)",
                      registry=REGISTRY)
PREEMPTIONS = Counter("mistral_grpc_preemptions",
                      "Sequences preempted for lack of KV blocks (recomputed later)", registry=REGISTRY)
KV_CACHE_BLOCKS_USED = Gauge("mistral_grpc_kv_cache_blocks_used",
                             "KV cache blocks held by live sequences (unheld prefix-cached blocks count as free)",
                             registry=REGISTRY)
KV_CACHE_BLOCKS_TOTAL = Gauge("mistral_grpc_kv_cache_blocks_total", "KV cache blocks allocated", registry=REGISTRY)
SPEC_DRAFT_TOKENS = Counter("mistral_grpc_spec_draft_tokens",
                            "Draft tokens verified by speculative decoding (predictions and prompt lookup)",
                            registry=REGISTRY)
SPEC_ACCEPTED_TOKENS = Counter("mistral_grpc_spec_accepted_tokens",
                               "Draft tokens accepted: the model drew exactly them", registry=REGISTRY)
