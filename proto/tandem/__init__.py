"""Generated gRPC code for Tandem's public API (package `tandem.v1`)."""
