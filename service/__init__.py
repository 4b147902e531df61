"""The gRPC gateway: servicer, core, backends, cache, metrics, config and the server entry point."""
