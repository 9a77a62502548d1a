"""Support for tests and benchmarks, importable by both without path edits: DICOM objects built in
memory (``dicom``), a pynetdicom SCU and free ports (``scu``), the tiny OpenVINO model
(``toymodel``) and an Orthanc PACS on loopback (``orthanc``).

Nothing the node runs imports this package (tests/worker/test_packaging.py checks it); it needs
what the tests need (pytest, imagecodecs) only where a helper uses them.
"""
