"""From a corpus to validated questions, and the question format in and out.

adapters.py reads a corpus (files, hub datasets, synthetic) into rows; files.py the file formats;
questions.py validates and caches them on a worker; prompts.py renders prompts; answers.py extracts
and normalises answers.
"""
