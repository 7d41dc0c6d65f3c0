"""Training infrastructure: TOML configs, CPU compatibility shims, offline debug assets.

Kept import-light on purpose: ``cpu_compat.apply()`` has to run before TorchTitan's
``tools.utils`` picks its device type, so nothing here imports TorchTitan eagerly.
"""
