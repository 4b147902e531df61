"""Security of the gateway: TLS and mutual TLS, bearer tokens, the audit log, the health-only port, call caps.

Everything here reloads what can be rotated (certificates, keys, client CAs, the token file) without a restart.
"""
