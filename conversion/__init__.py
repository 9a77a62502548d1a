"""Conversion stage (torch -> OpenVINO IR + model card), the only producer of what the worker loads.

Installed with the ``train`` extra; never imported by ``worker``.
"""
