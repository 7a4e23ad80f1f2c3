"""The multi-tenant server (routing, tenant store, app) and the client that encrypts locally."""
