"""Teacher chain-of-thought for the hard band.

stage.py runs on the driver and in Ray Data actors; core.py is pure: answer checks, retries and the
accounting of verified, wrong and dropped rows.
"""
