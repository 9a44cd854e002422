"""Held-out accuracy per target and band.

stage.py runs on the driver and in Ray Data actors; core.py is the pure statistics (bootstrap
intervals, paired differences, accuracy tables).
"""
