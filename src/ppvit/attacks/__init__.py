"""The security audit: attacks on ppvit's own cipher and models, measured, and their one report writer."""
