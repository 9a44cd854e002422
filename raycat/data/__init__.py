"""From a corpus to validated questions, and the question format in and out.

sources.py resolves data.path (local, URI, prefix, glob) into files; files.py reads the file formats;
adapters.py maps each schema to question records and holds the per-row rules; corpus.py decides the
whole-corpus rules from per-file results; questions.py writes questions/ on a worker, and parallel.py
with one Ray task per file; prompts.py renders prompts; answers.py extracts and normalises answers.
"""
