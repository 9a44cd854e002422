"""The run's outputs where other tools read them: the training conversations of every recipe's phases
and the teacher's verified chain-of-thought as a Hugging Face dataset (``save_to_disk``), as chat
``messages`` JSON Lines (TRL's SFTTrainer), ShareGPT and Alpaca JSON Lines with LLaMA-Factory's
``dataset_info.json``, and a dataset card stating where every row came from.

formats.py is pure (a row in, a record out); card.py writes the card's text from the run's metrics;
data.py streams a run dir's files into them, a batch at a time.
"""
