"""Training stage (torch): the Nandi & Mulimani hybrid, its baselines and the experiment protocol.

Installed with the ``train`` extra; never imported by ``worker``. Uses ``worker.imaging`` for
every pixel it trains on, so training and serving see the same preprocessing.
"""
