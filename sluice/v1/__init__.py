"""Stubs generated from ``protos/sluice/v1/*.proto`` by ``python -m service.gen_protos``; do not edit."""
