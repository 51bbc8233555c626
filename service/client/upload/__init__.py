"""The parts of an upload: request messages, batching plan, calls, worker pool, run state,
failure log and result. `service.client.uploads` puts them together."""
