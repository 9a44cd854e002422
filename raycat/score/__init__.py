"""Student scoring: the first answer token's entropy for every question.

stage.py runs on the driver and in Ray Data actors; core.py is the pure per-row logic; metrics.py
the accuracy / ROC AUC summary.
"""
