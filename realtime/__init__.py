"""The ``realtime`` command: gateway, history worker and a one-command dev cluster."""
