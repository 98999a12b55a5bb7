"""The node's HTTP API: one module per surface (`page`: /generate; `chat`, `completions`,
`embeddings`, `models`: OpenAI's /v1; `node`: health, metrics, the OpenAPI document),
`endpoint` for what they share, and one middleware per file (`access_log`,
`security_headers`, `auth`)."""
