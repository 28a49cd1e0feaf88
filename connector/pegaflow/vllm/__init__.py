"""vLLM integration: the parts of `pegaflow.connector.PegaKVConnector`.

Split by role so the scheduler process never touches tensors and the worker never looks up:
`config` (kv_connector_extra_config), `layout` (namespace from shapes and strides, region
export), `scheduler` and `worker` (the two halves), `metadata` (what crosses between them).
"""
